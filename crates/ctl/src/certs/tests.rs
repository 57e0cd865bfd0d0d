use super::*;
use std::sync::Arc;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn der_of(path: &Path) -> Vec<u8> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(&read(path)).expect("PEM");
    assert_eq!(pem.label, "CERTIFICATE");
    pem.contents
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).expect("X.509");
    assert!(rest.is_empty());
    cert
}

fn attr(cert: &X509Certificate<'_>, which: &str) -> Vec<String> {
    let s = cert.subject();
    let it: Vec<_> = match which {
        "CN" => s.iter_common_name().collect(),
        "OU" => s.iter_organizational_unit().collect(),
        "O" => s.iter_organization().collect(),
        _ => unreachable!(),
    };
    it.into_iter().map(|a| a.as_str().expect("string attribute").to_string()).collect()
}

fn sans(cert: &X509Certificate<'_>) -> (Vec<String>, Vec<IpAddr>) {
    let ext = cert.subject_alternative_name().expect("SAN parses").expect("SAN present");
    let (mut dns, mut ips) = (vec![], vec![]);
    for name in &ext.value.general_names {
        match name {
            GeneralName::DNSName(d) => dns.push(d.to_string()),
            GeneralName::IPAddress(b) => ips.push(match b.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()),
                16 => IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()),
                n => panic!("IP SAN of {n} bytes"),
            }),
            other => panic!("unexpected SAN {other:?}"),
        }
    }
    (dns, ips)
}

fn key_ids(cert: &X509Certificate<'_>) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    let (mut ski, mut aki) = (None, None);
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => ski = Some(k.0.to_vec()),
            ParsedExtension::AuthorityKeyIdentifier(a) => aki = a.key_identifier.as_ref().map(|k| k.0.to_vec()),
            _ => {}
        }
    }
    (ski, aki)
}

fn approx(actual: OffsetDateTime, expected: OffsetDateTime) {
    assert!((actual - expected).abs() < Duration::minutes(5), "{actual} is not about {expected}");
}

/// The checks every leaf must pass: signed by the CA, subject, usages,
/// validity, SANs. Returns its SANs.
fn check_leaf(ca_der: &[u8], leaf_der: &[u8], role: Role, name: &str) -> (Vec<String>, Vec<IpAddr>) {
    let ca = parse(ca_der);
    let leaf = parse(leaf_der);
    leaf.verify_signature(Some(ca.public_key())).expect("leaf is signed by the CA key");
    assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw(), "issuer is the CA's subject, byte for byte");
    assert_eq!(attr(&leaf, "CN"), [name]);
    assert_eq!(attr(&leaf, "OU"), [role.as_str()]);
    assert_eq!(attr(&leaf, "O"), ["fleet"]);
    assert!(!leaf.is_ca());
    let eku = leaf.extended_key_usage().unwrap().expect("EKU present").value;
    assert!(eku.server_auth && eku.client_auth, "EKU serverAuth + clientAuth");
    let ku = leaf.key_usage().unwrap().expect("KU present").value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let now = OffsetDateTime::now_utc();
    approx(leaf.validity().not_before.to_datetime(), now - Duration::hours(1));
    approx(leaf.validity().not_after.to_datetime(), now + Duration::days(365));
    assert_eq!(key_ids(&leaf).1, key_ids(&ca).0, "authority key id = CA's subject key id");
    assert_eq!(leaf.public_key().algorithm.algorithm, x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY);
    let (dns, ips) = sans(&leaf);
    assert!(dns.iter().any(|d| d == "localhost"), "{dns:?}");
    assert!(ips.contains(&IpAddr::from([127, 0, 0, 1])), "{ips:?}");
    (dns, ips)
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

#[test]
fn init_writes_the_ca_and_one_certificate_per_role() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs"); // created by init
    let written = init(&dir, false).unwrap();
    let mut expected = vec![dir.join("ca.pem"), dir.join("ca-key.pem")];
    for role in ["coordinator", "node", "operator", "viewer"] {
        expected.push(dir.join(format!("{role}.pem")));
        expected.push(dir.join(format!("{role}-key.pem")));
    }
    assert_eq!(written, expected);
    let mut on_disk: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    on_disk.sort();
    expected.sort();
    assert_eq!(on_disk, expected, "exactly the ten files, no temporary files left");

    let ca_der = der_of(&dir.join("ca.pem"));
    let ca = parse(&ca_der);
    ca.verify_signature(None).expect("CA is self-signed");
    assert!(ca.is_ca());
    let ku = ca.key_usage().unwrap().expect("CA KU").value;
    assert!(ku.key_cert_sign() && ku.crl_sign() && ku.digital_signature());
    let cn = &attr(&ca, "CN")[0];
    let tag = cn.strip_prefix("Fleet cluster CA ").expect(cn);
    assert!(tag.len() == 8 && tag.bytes().all(|b| b.is_ascii_hexdigit()), "{cn}");
    let now = OffsetDateTime::now_utc();
    approx(ca.validity().not_before.to_datetime(), now - Duration::hours(1));
    approx(ca.validity().not_after.to_datetime(), add_years(now, 10));

    for role in Role::ALL {
        check_leaf(&ca_der, &der_of(&dir.join(format!("{role}.pem"))), role, role.as_str());
        let key = fs::read_to_string(dir.join(format!("{role}-key.pem"))).unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8");
        assert_eq!(KeyPair::from_pem(&key).unwrap().algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
    }
}

#[test]
fn two_inits_make_different_cas() {
    let tmp = tempfile::tempdir().unwrap();
    init(&tmp.path().join("a"), false).unwrap();
    init(&tmp.path().join("b"), false).unwrap();
    let a = parse(&der_of(&tmp.path().join("a/ca.pem"))).subject().to_string();
    let b = parse(&der_of(&tmp.path().join("b/ca.pem"))).subject().to_string();
    assert_ne!(a, b);
}

#[test]
fn init_refuses_an_existing_ca_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), false).unwrap();
    let before = read(&tmp.path().join("ca.pem"));
    let msg = err_text(init(tmp.path(), false));
    assert!(msg.contains("--force") && msg.contains("another --out directory"), "{msg}");
    assert!(msg.contains("ca.pem"), "{msg}");
    assert_eq!(read(&tmp.path().join("ca.pem")), before, "untouched");

    init(tmp.path(), true).unwrap();
    assert_ne!(read(&tmp.path().join("ca.pem")), before, "--force makes a new CA");
}

#[test]
fn init_into_a_directory_without_a_ca_is_fine() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("notes.txt"), "x").unwrap();
    assert_eq!(init(tmp.path(), false).unwrap().len(), 10);
}

#[cfg(unix)]
#[test]
fn key_files_are_0600() {
    let tmp = tempfile::tempdir().unwrap();
    for path in init(tmp.path(), false).unwrap() {
        let want = if path.to_string_lossy().ends_with("-key.pem") { 0o600 } else { 0o644 & !umask_bits() };
        assert_eq!(mode(&path), want, "{}", path.display());
    }
    // Re-issuing over a key file that somebody made world-readable.
    let (_, key) = issue(tmp.path(), Role::Operator, "alice", &[], tmp.path()).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let (_, key) = issue(tmp.path(), Role::Operator, "alice", &[], tmp.path()).unwrap();
    assert_eq!(mode(&key), 0o600);
}

/// Only certificates depend on the umask; read it without changing it.
#[cfg(unix)]
fn umask_bits() -> u32 {
    let tmp = tempfile::tempdir().unwrap();
    let probe = tmp.path().join("probe");
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        fs::OpenOptions::new().write(true).create_new(true).mode(0o777).open(&probe).unwrap();
    }
    !mode(&probe) & 0o777
}

#[test]
fn issue_signs_with_the_existing_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    init(&ca_dir, false).unwrap();
    let out = tmp.path().join("out/nested"); // created by issue
    let extra = ["10.0.0.12", "Coord-2.Example.com", "[::1]", "localhost", "*.fleet.internal"].map(String::from);
    let (cert, key) = issue(&ca_dir, Role::Coordinator, "coord-2", &extra, &out).unwrap();
    assert_eq!((cert.clone(), key.clone()), (out.join("coord-2.pem"), out.join("coord-2-key.pem")));
    let (dns, ips) = check_leaf(&der_of(&ca_dir.join("ca.pem")), &der_of(&cert), Role::Coordinator, "coord-2");
    assert_eq!(dns, ["localhost", "coord-2.example.com", "*.fleet.internal"], "no duplicates, lower case");
    assert_eq!(ips, [IpAddr::from([127, 0, 0, 1]), IpAddr::from([10, 0, 0, 12]), "::1".parse().unwrap()]);
    KeyPair::from_pem(&fs::read_to_string(&key).unwrap()).unwrap();
    #[cfg(unix)]
    assert_eq!(mode(&key), 0o600);
    // The CA directory was only read.
    assert_eq!(fs::read_dir(&ca_dir).unwrap().count(), 10);
}

#[test]
fn issue_accepts_names_up_to_64_characters() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), false).unwrap();
    for name in ["a", "ci_bot.eu-west-1", "0day", &"x".repeat(64)] {
        let (cert, _) = issue(tmp.path(), Role::Viewer, name, &[], tmp.path()).unwrap();
        check_leaf(&der_of(&tmp.path().join("ca.pem")), &der_of(&cert), Role::Viewer, name);
    }
}

#[test]
fn issue_rejects_bad_names_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    init(&ca_dir, false).unwrap();
    let out = tmp.path().join("out");
    let long = "x".repeat(65);
    for name in ["", "a/b", "../x", "a b", "bob!", "zoë", ".hidden", "-rf", "..", &long] {
        let msg = err_text(issue(&ca_dir, Role::Operator, name, &[], &out));
        assert!(msg.contains("A-Z a-z 0-9 . _ -") && msg.contains("64"), "{name:?}: {msg}");
    }
    for name in ["ca", "ca-key", "operator-key"] {
        let msg = err_text(issue(&ca_dir, Role::Operator, name, &[], &ca_dir));
        assert!(msg.contains("reserved") && msg.contains("pick another name"), "{name:?}: {msg}");
    }
    assert!(!out.exists());
    assert_eq!(fs::read_dir(&ca_dir).unwrap().count(), 10);
}

#[test]
fn issue_rejects_bad_sans() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), false).unwrap();
    for san in ["", "a..b", "-a.com", "exa mple.com", "ex_ample.com", "bücher.de", "1.2.3.4/24", "a.*.com", &"a".repeat(64)] {
        let msg = err_text(issue(tmp.path(), Role::Node, "n1", &[san.to_string()], tmp.path()));
        assert!(msg.contains("neither an IP address nor a DNS name"), "{san:?}: {msg}");
    }
    assert!(!tmp.path().join("n1.pem").exists());
}

#[test]
fn issue_without_a_ca_says_to_run_init() {
    let tmp = tempfile::tempdir().unwrap();
    let msg = err_text(issue(tmp.path(), Role::Operator, "alice", &[], tmp.path()));
    assert!(msg.contains("cannot read CA key") && msg.contains("ca-key.pem"), "{msg}");
    assert!(msg.contains(&format!("run `fleetctl certs init --out {}` first", tmp.path().display())), "{msg}");

    // Key present, certificate missing.
    init(tmp.path(), false).unwrap();
    fs::remove_file(tmp.path().join("ca.pem")).unwrap();
    let msg = err_text(issue(tmp.path(), Role::Operator, "alice", &[], tmp.path()));
    assert!(msg.contains("cannot read CA certificate") && msg.contains("fleetctl certs init"), "{msg}");
}

#[test]
fn issue_refuses_a_ca_certificate_and_key_that_do_not_match() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    init(&a, false).unwrap();
    init(&b, false).unwrap();
    fs::copy(b.join("ca-key.pem"), a.join("ca-key.pem")).unwrap();
    let msg = err_text(issue(&a, Role::Operator, "alice", &[], tmp.path()));
    assert!(msg.contains("do not belong together"), "{msg}");

    // Not a CA certificate at all (a leaf in place of ca.pem).
    fs::copy(a.join("viewer.pem"), b.join("ca.pem")).unwrap();
    let msg = err_text(issue(&b, Role::Operator, "alice", &[], tmp.path()));
    assert!(msg.contains("do not belong together"), "{msg}");

    fs::write(b.join("ca.pem"), "hello").unwrap();
    let msg = err_text(issue(&b, Role::Operator, "alice", &[], tmp.path()));
    assert!(msg.contains("not a PEM certificate"), "{msg}");
    assert!(!tmp.path().join("alice.pem").exists());
}

#[test]
fn issue_signs_with_a_ca_whose_subject_init_did_not_write() {
    // The issuer is read from ca.pem, not rebuilt: a CA with another
    // subject (made by hand with the same key) still gets leaves that chain.
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), false).unwrap();
    let key = KeyPair::from_pem(&fs::read_to_string(tmp.path().join("ca-key.pem")).unwrap()).unwrap();
    let mut params = ca_params(&key);
    params.distinguished_name.push(DnType::OrganizationName, "acme");
    fs::write(tmp.path().join("ca.pem"), params.self_signed(&key).unwrap().pem()).unwrap();
    let (cert, _) = issue(tmp.path(), Role::Operator, "alice", &[], tmp.path()).unwrap();
    let ca_der = der_of(&tmp.path().join("ca.pem"));
    check_leaf(&ca_der, &der_of(&cert), Role::Operator, "alice");
    assert_eq!(parse(&der_of(&cert)).issuer().iter_organization().count(), 1, "the issuer names O=acme");
}

#[test]
fn issue_refuses_a_ca_key_certificate_that_is_not_a_ca() {
    // The CA's key, but in a certificate that may not sign others.
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), false).unwrap();
    let key = KeyPair::from_pem(&fs::read_to_string(tmp.path().join("ca-key.pem")).unwrap()).unwrap();
    let mut params = ca_params(&key);
    params.is_ca = IsCa::ExplicitNoCa;
    fs::write(tmp.path().join("ca.pem"), params.self_signed(&key).unwrap().pem()).unwrap();
    let msg = err_text(issue(tmp.path(), Role::Operator, "alice", &[], tmp.path()));
    assert!(msg.contains("is not a CA certificate"), "{msg}");
    assert!(!tmp.path().join("alice.pem").exists());
}

#[test]
fn years_are_calendar_years() {
    let at = |y, m, d, h| time::Date::from_calendar_date(y, m, d).unwrap().with_hms(h, 15, 0).unwrap().assume_utc();
    use time::Month::*;
    assert_eq!(add_years(at(2024, February, 29, 12), 1), at(2025, March, 1, 12));
    assert_eq!(add_years(at(2024, February, 29, 12), 4), at(2028, February, 29, 12));
    assert_eq!(add_years(at(2025, June, 30, 8), 10), at(2035, June, 30, 8));
}

// ---- rustls accepts the certificates for mutual TLS --------------------

mod mtls {
    use super::*;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::server::WebPkiClientVerifier;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, SupportedProtocolVersion};

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(ca_dir: &Path) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(ca_dir.join("ca.pem")).unwrap()).unwrap();
        Arc::new(roots)
    }

    fn identity(cert: &Path, key: &Path) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (vec![CertificateDer::from_pem_file(cert).unwrap()], PrivateKeyDer::from_pem_file(key).unwrap())
    }

    fn server(ca_dir: &Path, cert: &Path, key: &Path, version: &'static SupportedProtocolVersion) -> ServerConnection {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_dir), provider()).build().unwrap();
        let (chain, key) = identity(cert, key);
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("server accepts its certificate and key");
        ServerConnection::new(Arc::new(config)).unwrap()
    }

    fn client(
        ca_dir: &Path,
        cert: &Path,
        key: &Path,
        version: &'static SupportedProtocolVersion,
        server_name: ServerName<'static>,
    ) -> ClientConnection {
        let (chain, key) = identity(cert, key);
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots(ca_dir))
            .with_client_auth_cert(chain, key)
            .expect("client accepts its certificate and key");
        ClientConnection::new(Arc::new(config), server_name).unwrap()
    }

    /// Shuttle TLS records between the two ends until both finish the
    /// handshake, then send one message each way.
    fn handshake(client: &mut ClientConnection, server: &mut ServerConnection) -> Result<(), rustls::Error> {
        use std::io::{Read as _, Write as _};
        for _ in 0..20 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                server.read_tls(&mut buf.as_slice()).unwrap();
                server.process_new_packets()?;
            }
            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                client.read_tls(&mut buf.as_slice()).unwrap();
                client.process_new_packets()?;
            }
            if !client.is_handshaking() && !server.is_handshaking() && !client.wants_write() && !server.wants_write() {
                client.writer().write_all(b"ping").unwrap();
                let mut buf = Vec::new();
                client.write_tls(&mut buf).unwrap();
                server.read_tls(&mut buf.as_slice()).unwrap();
                server.process_new_packets()?;
                let mut got = [0u8; 4];
                server.reader().read_exact(&mut got).unwrap();
                assert_eq!(&got, b"ping");
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    fn ip(addr: &str) -> ServerName<'static> {
        let ip: IpAddr = addr.parse().unwrap();
        ServerName::IpAddress(ip.into())
    }

    #[test]
    fn role_certificates_do_mutual_tls() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        init(d, false).unwrap();
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            for (server_name, client_name) in [("coordinator", "operator"), ("coordinator", "coordinator"), ("node", "viewer")] {
                for sni in [ip("127.0.0.1"), ServerName::try_from("localhost").unwrap()] {
                    let mut s = server(d, &d.join(format!("{server_name}.pem")), &d.join(format!("{server_name}-key.pem")), version);
                    let mut c =
                        client(d, &d.join(format!("{client_name}.pem")), &d.join(format!("{client_name}-key.pem")), version, sni.clone());
                    handshake(&mut c, &mut s).unwrap_or_else(|e| panic!("{version:?} {server_name} <- {client_name} as {sni:?}: {e}"));
                    assert_eq!(s.protocol_version(), Some(version.version));
                    let peer = s.peer_certificates().expect("server saw the client certificate");
                    let leaf = parse(peer[0].as_ref());
                    assert_eq!(attr(&leaf, "OU"), [client_name]);
                }
            }
        }
    }

    #[test]
    fn issued_certificate_serves_its_extra_sans() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        init(d, false).unwrap();
        let sans = ["10.0.0.12", "coord-2.example.com", "::1"].map(String::from);
        let (cert, key) = issue(d, Role::Coordinator, "coord-2", &sans, d).unwrap();
        for sni in [ip("10.0.0.12"), ip("::1"), ServerName::try_from("coord-2.example.com").unwrap()] {
            let mut s = server(d, &cert, &key, &rustls::version::TLS13);
            let mut c = client(d, &d.join("operator.pem"), &d.join("operator-key.pem"), &rustls::version::TLS13, sni.clone());
            handshake(&mut c, &mut s).unwrap_or_else(|e| panic!("{sni:?}: {e}"));
        }
        // A name the certificate does not carry is refused by the client.
        let mut s = server(d, &cert, &key, &rustls::version::TLS13);
        let mut c = client(d, &d.join("operator.pem"), &d.join("operator-key.pem"), &rustls::version::TLS13, ip("10.0.0.13"));
        let e = handshake(&mut c, &mut s).expect_err("wrong server name");
        assert!(matches!(e, rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. })), "{e:?}");
    }

    #[test]
    fn certificates_of_another_cluster_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        init(&a, false).unwrap();
        init(&b, false).unwrap();
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            // Client certificate from cluster b, server and trust of cluster a.
            let mut s = server(&a, &a.join("coordinator.pem"), &a.join("coordinator-key.pem"), version);
            let (chain, key) = identity(&b.join("operator.pem"), &b.join("operator-key.pem"));
            let config = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots(&a))
                .with_client_auth_cert(chain, key)
                .unwrap();
            let mut c = ClientConnection::new(Arc::new(config), ip("127.0.0.1")).unwrap();
            let e = handshake(&mut c, &mut s).expect_err("foreign client certificate");
            assert!(matches!(e, rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)), "{e:?}");

            // Server certificate from cluster b.
            let mut s = server(&a, &b.join("coordinator.pem"), &b.join("coordinator-key.pem"), version);
            let mut c = client(&a, &a.join("operator.pem"), &a.join("operator-key.pem"), version, ip("127.0.0.1"));
            let e = handshake(&mut c, &mut s).expect_err("foreign server certificate");
            assert!(matches!(e, rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)), "{e:?}");
        }
    }
}
