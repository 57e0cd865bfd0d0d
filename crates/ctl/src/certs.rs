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
//! `issue` loads the CA with rcgen's `Issuer::from_ca_cert_pem`, which
//! reads the subject, key identifier and key usages a leaf's issuer fields
//! need from `ca.pem` itself, so a leaf always chains to the CA it names.
//! Before that, x509-parser checks that `ca.pem` is a CA certificate for
//! the public key of `ca-key.pem`: a mismatched pair would only show much
//! later, as a failed handshake.

mod staging;
#[cfg(test)]
mod tests;

use std::fs;
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

use self::staging::{Secret, Staging};

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
    check_ca_certificate(&ca_cert_pem, &ca_key, &ca_cert_path, &ca_key_path)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key).map_err(|e| {
        anyhow!(
            "cannot use CA certificate {} to sign ({e}); use the {CA_CERT_FILE} written by `fleetctl certs init`",
            ca_cert_path.display()
        )
    })?;

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

fn leaf_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")))
}

/// The CA's subject, key usages and CA flag; `init` adds the validity
/// period. The subject names the cluster with a tag from the key
/// identifier of its fresh, random key, so two clusters' CAs differ.
fn ca_params(ca_key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
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

/// `ca.pem` must be a CA certificate holding `ca_key`'s public key.
fn check_ca_certificate(ca_cert_pem: &str, ca_key: &KeyPair, cert_path: &Path, key_path: &Path) -> anyhow::Result<()> {
    let pem = match x509_parser::pem::parse_x509_pem(ca_cert_pem.as_bytes()) {
        Ok((_, pem)) if pem.label == "CERTIFICATE" => pem,
        _ => bail!(
            "CA certificate {} is not a PEM certificate; use the {CA_CERT_FILE} written by `fleetctl certs init`",
            cert_path.display()
        ),
    };
    let cert = pem.parse_x509().map_err(|e| {
        anyhow!(
            "CA certificate {} does not parse as an X.509 certificate ({e}); use the {CA_CERT_FILE} written by `fleetctl certs init`",
            cert_path.display()
        )
    })?;
    if cert.public_key().raw != ca_key.subject_public_key_info().as_slice() {
        bail!(
            "CA certificate {} and CA key {} do not belong together; restore the pair `fleetctl certs init` wrote, \
             or create a new CA with `fleetctl certs init --force` (certificates of the old CA stop being trusted)",
            cert_path.display(),
            key_path.display()
        );
    }
    if !cert.is_ca() {
        bail!(
            "{} is not a CA certificate (it cannot sign others); use the {CA_CERT_FILE} written by `fleetctl certs init`",
            cert_path.display()
        );
    }
    Ok(())
}
