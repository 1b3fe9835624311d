//! `shardlock keygen`: a keyring with one KEK, a KEK inside an HSM, or an issuer key pair.

use shardlock::Error;
use shardlock::{IssuerKey, Keyring};

use crate::cli::Keygen;

pub(crate) fn keygen_cmd(k: Keygen) -> Result<(), Error> {
    match k {
        Keygen::Kek { out: Some(out), pkcs11: None } => {
            let ring = Keyring::create(&out)?;
            let id = ring.kek_ids().next().unwrap_or_default().to_owned();
            println!("wrote keyring {} (mode 0600) with KEK {id}", out.display());
        }
        Keygen::Kek { pkcs11: Some(uri), out: None } => keygen_pkcs11(&uri)?,
        Keygen::Kek { .. } => {
            return Err(Error::InvalidArgument("give either --out FILE or --pkcs11 URI".into()));
        }
        Keygen::Issuer { out } => {
            let key = IssuerKey::generate()?;
            let public = key.save(&out)?;
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

fn keygen_pkcs11(uri: &str) -> Result<(), Error> {
    let uri = shardlock::pkcs11::Pkcs11Uri::parse(uri)?;
    let id = shardlock::pkcs11::generate_kek(&uri)?;
    println!("generated non-extractable AES-256 KEK {id} as {} inside the HSM", uri.describe());
    Ok(())
}
