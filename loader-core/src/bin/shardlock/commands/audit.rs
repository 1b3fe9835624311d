//! `shardlock audit`: the audit log's hash chain.

use std::process::ExitCode;

use shardlock::Error;

use crate::cli::AuditCmd;
use crate::output::print_json;

pub(crate) fn audit_cmd(c: AuditCmd) -> Result<ExitCode, Error> {
    match c {
        AuditCmd::Verify { file, json } => {
            match shardlock::verify_log(&file) {
                Ok(s) => {
                    if json {
                        print_json(&serde_json::json!({"ok": true, "records": s.records, "head": s.head}));
                    } else {
                        println!("OK: {} records, chain intact; head hash {} (record it elsewhere to detect later truncation)", s.records, s.head);
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e @ Error::Audit { .. }) => {
                    if json {
                        let line = if let Error::Audit { line, .. } = &e { *line } else { None };
                        print_json(&serde_json::json!({"ok": false, "line": line, "error": e.to_string()}));
                    } else {
                        println!("FAILED: {e}");
                    }
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => Err(e),
            }
        }
    }
}
