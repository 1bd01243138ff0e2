//! A throwaway PKI made with openssl: a CA, a broker certificate for 127.0.0.1, and a
//! client certificate, for TLS tests with client authentication.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Signed by the same CA, but no longer valid.
    pub expired_server_cert: PathBuf,
    pub expired_server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    if let Err(why) = try_openssl(dir, args) {
        panic!("openssl {args:?}: {why}");
    }
}

fn try_openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (scripts/install-deps.sh installs it)");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// How long a leaf certificate is valid.
#[derive(Clone, Copy)]
enum Validity {
    Days(&'static str),
    /// Its validity ended long ago.
    Expired,
}

/// A CA named `name` and certificates it signed, in `dir`.
pub fn make(dir: &Path, name: &str) -> Pki {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    let (ca, ca_key) = (p("ca.pem"), p("ca.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            ca_key.to_str().unwrap(),
            "-out",
            ca.to_str().unwrap(),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} test CA"),
        ],
    );
    let leaf = |stem: &str, cn: &str, ext: &str, validity: Validity| -> (PathBuf, PathBuf) {
        let (key, csr, cert, extf) = (
            p(&format!("{stem}.key")),
            p(&format!("{stem}.csr")),
            p(&format!("{stem}.pem")),
            p(&format!("{stem}.ext")),
        );
        std::fs::write(&extf, ext).unwrap();
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                csr.to_str().unwrap(),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        let sign = |dates: &[&str]| -> Result<(), String> {
            let mut args = vec![
                "x509",
                "-req",
                "-in",
                csr.to_str().unwrap(),
                "-CA",
                ca.to_str().unwrap(),
                "-CAkey",
                ca_key.to_str().unwrap(),
                "-CAcreateserial",
                "-out",
                cert.to_str().unwrap(),
                "-extfile",
                extf.to_str().unwrap(),
            ];
            args.extend_from_slice(dates);
            try_openssl(dir, &args).map_err(|why| format!("openssl {args:?}: {why}"))
        };
        match validity {
            Validity::Days(days) => sign(&["-days", days]).unwrap_or_else(|why| panic!("{why}")),
            // OpenSSL 3.4 and later (Debian 13) take explicit dates and refuse a
            // negative `-days`; 3.0 (Debian 12) knows only `-days`, where -1 puts the
            // end a day before the start.
            Validity::Expired => {
                sign(&[
                    "-not_before",
                    "20200101000000Z",
                    "-not_after",
                    "20200102000000Z",
                ])
                .or_else(|_| sign(&["-days", "-1"]))
                .unwrap_or_else(|why| panic!("{why}"));
            }
        }
        (cert, key)
    };
    let server_ext = "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";
    let (server_cert, server_key) = leaf("server", "127.0.0.1", server_ext, Validity::Days("2"));
    let (expired_server_cert, expired_server_key) =
        leaf("server-expired", "127.0.0.1", server_ext, Validity::Expired);
    let (client_cert, client_key) = leaf(
        "client",
        "dev-test",
        "extendedKeyUsage=clientAuth\n",
        Validity::Days("2"),
    );
    Pki {
        ca,
        server_cert,
        server_key,
        expired_server_cert,
        expired_server_key,
        client_cert,
        client_key,
    }
}
