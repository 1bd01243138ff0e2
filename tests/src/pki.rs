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
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let leaf = |stem: &str, cn: &str, ext: &str, days: &str| -> (PathBuf, PathBuf) {
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
        openssl(
            dir,
            &[
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
                "-days",
                days,
                "-extfile",
                extf.to_str().unwrap(),
            ],
        );
        (cert, key)
    };
    let server_ext = "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";
    let (server_cert, server_key) = leaf("server", "127.0.0.1", server_ext, "2");
    // Valid until yesterday: `-days -1` puts its end before its start.
    let (expired_server_cert, expired_server_key) =
        leaf("server-expired", "127.0.0.1", server_ext, "-1");
    let (client_cert, client_key) =
        leaf("client", "dev-test", "extendedKeyUsage=clientAuth\n", "2");
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
