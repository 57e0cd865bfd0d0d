//! Certificates for `fleetctl certs init` and `fleetctl certs issue`.
//!
//! A cluster has one CA. Every Fleet process holds a certificate signed by
//! it whose subject carries the holder's name (CN) and role (OU), with
//! O=fleet. Every process is both a TLS client and a TLS server, so every
//! leaf certificate is good for both (EKU serverAuth + clientAuth) and names
//! `localhost` and `127.0.0.1` besides any `--san`.
//!
//! Keys are ECDSA P-256, written as PKCS#8 PEM with mode 0600.
//!
//! ## Reading the CA back
//!
//! rcgen is built without its `x509-parser` feature, so it cannot parse a
//! CA certificate (`Issuer::from_ca_cert_pem` does not exist in this build).
//! What rcgen needs to sign a leaf is only the issuer's subject name, key
//! identifier method and key usages, so `issue` rebuilds those from the CA
//! key: the CA's subject is derived from its key (`CN=Fleet cluster CA
//! <first 4 bytes of the key identifier, in hex>`). Before signing, a small
//! DER walk over `ca.pem` checks that its public key is the CA key's and its
//! subject is byte for byte the one the leaf will name as its issuer;
//! otherwise the leaf would not chain, which would only show much later as
//! a failed handshake.

use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use fleet_core::auth::Role;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData as _, SanType,
};
use time::{Duration, OffsetDateTime};

/// The CA certificate in a certificates directory.
const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key in a certificates directory.
const CA_KEY_FILE: &str = "ca-key.pem";

/// Longest certificate name (CN) `issue` accepts.
const NAME_MAX: usize = 64;
const CA_YEARS: i32 = 10;
const LEAF_YEARS: i32 = 1;

/// Creates DIR/ca.pem + DIR/ca-key.pem and one certificate per role:
/// DIR/coordinator.pem, DIR/node.pem, DIR/operator.pem, DIR/viewer.pem with keys DIR/<name>-key.pem.
/// Refuses (error that says to pass --force or pick another dir) if DIR/ca.pem exists and !force.
/// Returns the paths written.
pub fn init(dir: &Path, force: bool) -> anyhow::Result<Vec<PathBuf>> {
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    // symlink_metadata: a dangling symlink named ca.pem also counts.
    if !force && fs::symlink_metadata(&ca_cert_path).is_ok() {
        bail!(
            "{} already exists; pass --force to replace this CA and all four role certificates \
             (certificates the old CA issued stop being trusted), or pick another --out directory",
            ca_cert_path.display()
        );
    }
    fs::create_dir_all(dir).map_err(|e| anyhow!("cannot create directory {}: {e}; check the path and its permissions", dir.display()))?;

    let now = OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = ca_params(&ca_key);
    ca.not_before = now - Duration::hours(1);
    ca.not_after = add_years(now, CA_YEARS);
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA certificate")?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);

    // Everything is generated and written to temporary files before any
    // file is renamed into place; ca.pem goes last, so an init that failed
    // part way can be run again without --force.
    let mut staged = Staging::default();
    staged.add(&ca_key_path, ca_key_pem.as_bytes(), Secret::Yes)?;
    let mut written = vec![ca_cert_path.clone(), ca_key_path.clone()];
    for role in Role::ALL {
        let (cert_pem, key_pem) = sign_leaf(&issuer, role, role.as_str(), &[], now)?;
        let (cert_path, key_path) = leaf_paths(dir, role.as_str());
        staged.add(&cert_path, cert_pem.as_bytes(), Secret::No)?;
        staged.add(&key_path, key_pem.as_bytes(), Secret::Yes)?;
        written.extend([cert_path, key_path]);
    }
    staged.add(&ca_cert_path, ca_cert.pem().as_bytes(), Secret::No)?;
    staged.commit()?;
    Ok(written)
}

/// Issues a certificate signed by the CA in ca_dir (ca.pem + ca-key.pem), with subject CN=name, OU=role, O=fleet,
/// writes out_dir/<name>.pem and out_dir/<name>-key.pem. Returns (cert path, key path).
pub fn issue(ca_dir: &Path, role: Role, name: &str, sans: &[String], out_dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    validate_name(name)?;
    let extra_sans = parse_sans(sans)?;

    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let init_hint = format!(
        "run `fleetctl certs init --out {}` first, or point --ca-dir at the directory that holds {CA_CERT_FILE} and {CA_KEY_FILE}",
        ca_dir.display()
    );
    let ca_key_pem =
        fs::read_to_string(&ca_key_path).map_err(|e| anyhow!("cannot read CA key {}: {e}; {init_hint}", ca_key_path.display()))?;
    let ca_cert_pem = fs::read_to_string(&ca_cert_path)
        .map_err(|e| anyhow!("cannot read CA certificate {}: {e}; {init_hint}", ca_cert_path.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| {
        anyhow!(
            "CA key {} is not a PKCS#8 PEM private key ({e}); use the {CA_KEY_FILE} written by `fleetctl certs init`",
            ca_key_path.display()
        )
    })?;
    let ca = ca_params(&ca_key);
    check_ca_certificate(&ca_cert_pem, &ca_key, &ca, &ca_cert_path, &ca_key_path)?;
    let issuer = Issuer::new(ca, ca_key);

    let (cert_pem, key_pem) = sign_leaf(&issuer, role, name, &extra_sans, OffsetDateTime::now_utc())?;
    fs::create_dir_all(out_dir)
        .map_err(|e| anyhow!("cannot create directory {}: {e}; check the path or pass another --out", out_dir.display()))?;
    let (cert_path, key_path) = leaf_paths(out_dir, name);
    let mut staged = Staging::default();
    staged.add(&key_path, key_pem.as_bytes(), Secret::Yes)?;
    staged.add(&cert_path, cert_pem.as_bytes(), Secret::No)?;
    staged.commit()?;
    Ok((cert_path, key_path))
}

// `identity_of(cert_pem) -> (CN, Role)` is deliberately absent: rcgen can
// only parse certificates with its `x509-parser` feature, which fleetctl
// does not enable.

fn leaf_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")))
}

/// The CA's parameters as far as they depend on its key: subject, key
/// usages, CA flag. `init` adds the validity period; `issue` uses them
/// as the issuer of a leaf.
fn ca_params(ca_key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    // Derived from the key, so `issue` can rebuild the CA's subject from
    // ca-key.pem (see the module docs). The key is fresh and random, so
    // this is a random tag that tells clusters apart.
    let key_id = params.key_identifier(ca_key);
    let tag: String = key_id.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Fleet cluster CA {tag}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

/// A fresh key and a certificate for it signed by `issuer`, both as PEM.
fn sign_leaf(
    issuer: &Issuer<'_, KeyPair>,
    role: Role,
    name: &str,
    extra_sans: &[SanType],
    now: OffsetDateTime,
) -> anyhow::Result<(String, String)> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "fleet");
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let mut sans = vec![SanType::DnsName(Ia5String::try_from("localhost")?), SanType::IpAddress(IpAddr::from([127, 0, 0, 1]))];
    for san in extra_sans {
        if !sans.contains(san) {
            sans.push(san.clone());
        }
    }
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - Duration::hours(1);
    params.not_after = add_years(now, LEAF_YEARS);

    let key = KeyPair::generate().with_context(|| format!("generating a key for `{name}`"))?;
    let cert = params.signed_by(&key, issuer).with_context(|| format!("signing the certificate for `{name}`"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Same day and time `years` later (Feb 29 becomes Mar 1 when needed).
fn add_years(t: OffsetDateTime, years: i32) -> OffsetDateTime {
    let year = t.year() + years;
    t.replace_year(year).unwrap_or_else(|_| (t - Duration::days(1)).replace_year(year).expect("every year has Feb 28") + Duration::days(1))
}

fn validate_name(name: &str) -> anyhow::Result<()> {
    let allowed = "use 1 to 64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit";
    let chars_ok = name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    let first_ok = name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
    if !chars_ok || !first_ok || name.len() > NAME_MAX {
        bail!("invalid certificate name `{name}`: {allowed}");
    }
    // NAME.pem and NAME-key.pem must not land on the CA's files or on
    // another certificate's key file.
    if name == "ca" || name.ends_with("-key") {
        bail!(
            "certificate name `{name}` is reserved: `ca` and names ending in `-key` would overwrite \
             {CA_CERT_FILE}/{CA_KEY_FILE} or another certificate's key file; pick another name"
        );
    }
    Ok(())
}

/// Each `--san` is an IP address (IPv6 may be in brackets) or a DNS name.
fn parse_sans(sans: &[String]) -> anyhow::Result<Vec<SanType>> {
    let mut out: Vec<SanType> = Vec::new();
    for raw in sans {
        let s = raw.trim();
        let unbracketed = s.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(s);
        let san = if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            SanType::IpAddress(ip)
        } else if is_dns_name(s) {
            SanType::DnsName(Ia5String::try_from(s.to_ascii_lowercase())?)
        } else {
            bail!(
                "--san `{raw}` is neither an IP address nor a DNS name; a DNS name is dot-separated labels of \
                 1 to 63 letters, digits and '-' (at most 253 characters, `*.` allowed in front)"
            );
        };
        if !out.contains(&san) {
            out.push(san);
        }
    }
    Ok(out)
}

fn is_dns_name(s: &str) -> bool {
    let labels = s.strip_prefix("*.").unwrap_or(s);
    !labels.is_empty()
        && s.len() <= 253
        && labels.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `ca.pem` must hold `ca_key`'s public key and exactly the subject the
/// rebuilt issuer (`ca`) writes into the leaves it signs.
fn check_ca_certificate(
    ca_cert_pem: &str,
    ca_key: &KeyPair,
    ca: &CertificateParams,
    cert_path: &Path,
    key_path: &Path,
) -> anyhow::Result<()> {
    let der = pem_certificate(ca_cert_pem).ok_or_else(|| {
        anyhow!("CA certificate {} is not a PEM certificate; use the {CA_CERT_FILE} written by `fleetctl certs init`", cert_path.display())
    })?;
    let (subject, spki) = subject_and_spki(&der).ok_or_else(|| {
        anyhow!(
            "CA certificate {} does not parse as an X.509 certificate; use the {CA_CERT_FILE} written by `fleetctl certs init`",
            cert_path.display()
        )
    })?;
    if spki != ca_key.subject_public_key_info().as_slice() {
        bail!(
            "CA certificate {} and CA key {} do not belong together; restore the pair `fleetctl certs init` wrote, \
             or create a new CA with `fleetctl certs init --force` (certificates of the old CA stop being trusted)",
            cert_path.display(),
            key_path.display()
        );
    }
    // The subject rcgen writes for `ca`: from a throwaway self-signed
    // certificate (rcgen has no API that encodes a name on its own).
    let reference = ca.self_signed(ca_key).context("encoding the CA subject")?;
    let expected = subject_and_spki(reference.der()).map(|(subject, _)| subject.to_vec());
    if expected.as_deref() != Some(subject) {
        bail!(
            "CA certificate {} was not created by `fleetctl certs init` (its subject is not the one fleetctl gives \
             the CA of this key), so certificates signed here would not chain to it; use a CA from `fleetctl certs init`",
            cert_path.display()
        );
    }
    Ok(())
}

/// DER of the first `CERTIFICATE` block in `pem`.
fn pem_certificate(pem: &str) -> Option<Vec<u8>> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = pem.find(BEGIN)? + BEGIN.len();
    let len = pem[start..].find(END)?;
    base64_decode(&pem[start..start + len])
}

/// Standard base64 (RFC 4648 §4); whitespace is skipped.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    let mut padding = false;
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace()) {
        if c == b'=' {
            padding = true;
            continue;
        }
        if padding {
            return None;
        }
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// One DER element: its tag, the whole encoding and the contents.
struct Der<'a> {
    tag: u8,
    whole: &'a [u8],
    contents: &'a [u8],
}

/// The DER element at the start of `input`, and what follows it. Only
/// single-byte tags and definite lengths, which is all the outer structure
/// of a certificate uses.
fn der_element(input: &[u8]) -> Option<(Der<'_>, &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    let header = input.len() - rest.len();
    Some((Der { tag, whole: &input[..header + len], contents: &rest[..len] }, &rest[len..]))
}

/// The subject Name and SubjectPublicKeyInfo elements (whole, DER) of a
/// certificate.
fn subject_and_spki(cert: &[u8]) -> Option<(&[u8], &[u8])> {
    const SEQUENCE: u8 = 0x30;
    const INTEGER: u8 = 0x02;
    const VERSION: u8 = 0xa0; // [0] EXPLICIT
    let (cert, _) = der_element(cert).filter(|(e, _)| e.tag == SEQUENCE)?;
    let (tbs, _) = der_element(cert.contents).filter(|(e, _)| e.tag == SEQUENCE)?;
    let mut fields = Vec::new();
    let mut rest = tbs.contents;
    while !rest.is_empty() {
        let (field, after) = der_element(rest)?;
        fields.push(field);
        rest = after;
    }
    let skip = usize::from(fields.first()?.tag == VERSION);
    // serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo
    let fields = fields.get(skip..skip + 6)?;
    let tags: Vec<u8> = fields.iter().map(|f| f.tag).collect();
    if tags != [INTEGER, SEQUENCE, SEQUENCE, SEQUENCE, SEQUENCE, SEQUENCE] {
        return None;
    }
    Some((fields[4].whole, fields[5].whole))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Secret {
    Yes,
    No,
}

/// Files written next to their destination under a temporary name, renamed
/// into place by `commit`. Temporary files left when dropped are removed.
#[derive(Default)]
struct Staging {
    files: Vec<(PathBuf, PathBuf)>,
}

impl Staging {
    fn add(&mut self, dest: &Path, contents: &[u8], secret: Secret) -> anyhow::Result<()> {
        let file_name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dest.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
        let fail = |e: std::io::Error| anyhow!("cannot write {}: {e}; check that the directory exists and is writable", dest.display());
        // A leftover from a crashed run could have other permissions.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e)),
            _ => {}
        }
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            // Keys are never readable by others, not even briefly.
            options.mode(if secret == Secret::Yes { 0o600 } else { 0o644 });
        }
        let mut file = options.open(&tmp).map_err(fail)?;
        self.files.push((tmp, dest.to_path_buf()));
        file.write_all(contents).map_err(fail)?;
        #[cfg(unix)]
        if secret == Secret::Yes {
            use std::os::unix::fs::PermissionsExt as _;
            // Exactly 0600, whatever the umask made of the mode above.
            file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(fail)?;
        }
        file.sync_all().map_err(fail)?;
        Ok(())
    }

    /// Rename every file into place, in the order added.
    fn commit(mut self) -> anyhow::Result<()> {
        let files = std::mem::take(&mut self.files);
        for (i, (tmp, dest)) in files.iter().enumerate() {
            if let Err(e) = fs::rename(tmp, dest) {
                for (tmp, _) in &files[i..] {
                    let _ = fs::remove_file(tmp);
                }
                bail!("cannot write {}: {e}; check that the directory is writable", dest.display());
            }
        }
        // Make the renames durable; not every platform can sync a directory.
        let dirs: std::collections::BTreeSet<&Path> = files.iter().filter_map(|(_, dest)| dest.parent()).collect();
        for dir in dirs {
            let _ = fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        for (tmp, _) in &self.files {
            let _ = fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
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
    fn issue_refuses_a_ca_with_a_foreign_subject() {
        // Same key, but a subject `init` would not have written: leaves
        // signed with the rebuilt issuer would not chain to it.
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path(), false).unwrap();
        let key = KeyPair::from_pem(&fs::read_to_string(tmp.path().join("ca-key.pem")).unwrap()).unwrap();
        let mut params = ca_params(&key);
        params.distinguished_name.push(DnType::OrganizationName, "acme");
        fs::write(tmp.path().join("ca.pem"), params.self_signed(&key).unwrap().pem()).unwrap();
        let msg = err_text(issue(tmp.path(), Role::Operator, "alice", &[], tmp.path()));
        assert!(msg.contains("was not created by `fleetctl certs init`"), "{msg}");
    }

    #[test]
    fn der_helpers_agree_with_x509_parser() {
        let key = KeyPair::generate().unwrap();
        let params = ca_params(&key);
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(pem_certificate(&cert.pem()).unwrap(), cert.der().to_vec());
        let (subject, spki) = subject_and_spki(cert.der()).unwrap();
        let parsed = parse(cert.der());
        assert_eq!(subject, parsed.subject().as_raw());
        assert_eq!(spki, parsed.public_key().raw);
        assert_eq!(spki, key.subject_public_key_info().as_slice());
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVs\nbG8h").unwrap(), b"hello!");
        assert!(base64_decode("aGVs*G8=").is_none());
        assert!(subject_and_spki(&cert.der()[..40]).is_none());
        assert!(subject_and_spki(b"").is_none());
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
                        let mut c = client(
                            d,
                            &d.join(format!("{client_name}.pem")),
                            &d.join(format!("{client_name}-key.pem")),
                            version,
                            sni.clone(),
                        );
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
}
