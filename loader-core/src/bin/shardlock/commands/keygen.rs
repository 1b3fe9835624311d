//! `shardlock keygen`: a keyring with one KEK, a KEK inside an HSM, or an issuer key pair.

use shardlock::Error;
use shardlock::{IssuerKey, Keyring};

use crate::cli::Keygen;
use crate::output::print_json;

pub(crate) fn keygen_cmd(k: Keygen) -> Result<(), Error> {
    match k {
        Keygen::Kek { out: Some(out), pkcs11: None, json } => {
            let ring = Keyring::create(&out)?;
            let id = ring.kek_ids().next().unwrap_or_default().to_owned();
            if json {
                print_json(&serde_json::json!({"keyring": out, "kek_id": id, "mode": "0600"}));
            } else {
                println!("wrote keyring {} (mode 0600) with KEK {id}", out.display());
            }
        }
        Keygen::Kek { pkcs11: Some(uri), out: None, json } => keygen_pkcs11(&uri, json)?,
        Keygen::Kek { .. } => {
            return Err(Error::InvalidArgument("give either --out FILE or --pkcs11 URI".into()));
        }
        Keygen::Issuer { out, json } => {
            let key = IssuerKey::generate()?;
            let public = key.save(&out)?;
            if json {
                let id = key.trust_anchor().key_id();
                print_json(&serde_json::json!({"secret_key": out, "trust_anchor": public, "key_id": id}));
                return Ok(());
            }
            println!(
                "wrote issuer secret key {} (mode 0600) and trust anchor {} (key id {})",
                out.display(),
                public.display(),
                key.trust_anchor().key_id()
            );
        }
    }
    Ok(())
}

fn keygen_pkcs11(uri: &str, json: bool) -> Result<(), Error> {
    let uri = shardlock::pkcs11::Pkcs11Uri::parse(uri)?;
    let id = shardlock::pkcs11::generate_kek(&uri)?;
    if json {
        print_json(&serde_json::json!({"kek_id": id, "hsm": uri.describe(), "extractable": false}));
    } else {
        println!("generated non-extractable AES-256 KEK {id} as {} inside the HSM", uri.describe());
    }
    Ok(())
}
