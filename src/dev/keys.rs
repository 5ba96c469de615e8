//! Token signing keys for local issuers: generated with aws-lc-rs, kept as
//! PKCS#8 PEM files, published as JWKs and used to sign JWTs.
//!
//! The key id is the key's RFC 7638 JWK thumbprint, so the same file gives
//! the same `kid` in `rlsgate keygen`, `rlsgate issuer` and `rlsgate token`,
//! with nothing but the key to keep in step.
//!
//! Key formats handed to `jsonwebtoken` 11 (aws-lc-rs backend):
//! `EncodingKey::from_rsa_der` takes a PKCS#1 `RSAPrivateKey` (it calls
//! `RsaKeyPair::from_der`), so the PKCS#8 form of an RSA key is unwrapped
//! first; `from_ec_der` and `from_ed_der` take PKCS#8 as stored.

use std::fmt;
use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
    EcdsaSigningAlgorithm, Ed25519KeyPair, KeyPair as _,
};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The asymmetric key types the proxy accepts, one per JWK key type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// RSA (2048 bits when generated here), signed as RS256.
    Rs256,
    /// ECDSA P-256, signed as ES256.
    Es256,
    /// ECDSA P-384, signed as ES384.
    Es384,
    /// Ed25519, signed as EdDSA.
    EdDsa,
}

impl KeyKind {
    /// The kinds a `DevIssuer` generates one key of at start, in that order.
    /// P-384 keys are used only where given explicitly (see [`KeyKind::EVERY`]).
    pub const ALL: [KeyKind; 3] = [KeyKind::Rs256, KeyKind::Es256, KeyKind::EdDsa];

    /// Every kind, including those not generated at start.
    pub const EVERY: [KeyKind; 4] = [
        KeyKind::Rs256,
        KeyKind::Es256,
        KeyKind::Es384,
        KeyKind::EdDsa,
    ];

    /// The JWS algorithm tokens of this kind are signed with.
    pub fn algorithm(self) -> Algorithm {
        match self {
            KeyKind::Rs256 => Algorithm::RS256,
            KeyKind::Es256 => Algorithm::ES256,
            KeyKind::Es384 => Algorithm::ES384,
            KeyKind::EdDsa => Algorithm::EdDSA,
        }
    }

    /// Whether a key of this kind can sign as `alg`: an RSA key under any
    /// RSA algorithm (RS256/384/512, PS256/384/512), the others only under
    /// their own.
    pub fn signs_as(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rs256 => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            _ => alg == self.algorithm(),
        }
    }

    /// The JWK `alg` value.
    pub fn alg_name(self) -> &'static str {
        match self {
            KeyKind::Rs256 => "RS256",
            KeyKind::Es256 => "ES256",
            KeyKind::Es384 => "ES384",
            KeyKind::EdDsa => "EdDSA",
        }
    }
}

/// A private signing key with its public half. Holds only the PKCS#8
/// encoding and the public parameters read from it; the `kid`, the JWK and
/// the `jsonwebtoken` key are derived when asked for.
#[derive(Clone)]
pub struct SigningKeyPair {
    kind: KeyKind,
    pkcs8: Vec<u8>,
    public: PublicKey,
    /// Whether the JWK names `alg` (see [`SigningKeyPair::without_jwk_alg`]).
    jwk_alg: bool,
}

/// The public parameters a JWK carries, as unsigned big-endian bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PublicKey {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    P256 { x: Vec<u8>, y: Vec<u8> },
    P384 { x: Vec<u8>, y: Vec<u8> },
    Ed25519 { x: Vec<u8> },
}

const PEM_LABEL: &str = "PRIVATE KEY";

// Algorithm identifiers, as DER OBJECT IDENTIFIER contents.
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_RSASSA_PSS: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_P521: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x23];
const OID_X25519: &[u8] = &[0x2b, 0x65, 0x6e];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];
const OID_ED448: &[u8] = &[0x2b, 0x65, 0x71];

impl SigningKeyPair {
    /// A new random key of `kind`. RSA takes a noticeable moment: call it off
    /// async runtime threads where that matters.
    pub fn generate(kind: KeyKind) -> anyhow::Result<SigningKeyPair> {
        let pkcs8: Vec<u8> = match kind {
            KeyKind::Rs256 => {
                let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                    .map_err(|_| anyhow::anyhow!("RSA key generation failed"))?;
                let der: Pkcs8V1Der<'static> = pair
                    .as_der()
                    .map_err(|_| anyhow::anyhow!("RSA key export failed"))?;
                der.as_ref().to_vec()
            }
            KeyKind::Es256 | KeyKind::Es384 => {
                let (curve, name) = ec_curve(kind);
                EcdsaKeyPair::generate(curve)
                    .map_err(|_| anyhow::anyhow!("{name} key generation failed"))?
                    .to_pkcs8v1()
                    .map_err(|_| anyhow::anyhow!("{name} key export failed"))?
                    .as_ref()
                    .to_vec()
            }
            KeyKind::EdDsa => Ed25519KeyPair::generate()
                .map_err(|_| anyhow::anyhow!("Ed25519 key generation failed"))?
                .to_pkcs8v1()
                .map_err(|_| anyhow::anyhow!("Ed25519 key export failed"))?
                .as_ref()
                .to_vec(),
        };
        // One path for generated and loaded keys, so both are checked alike.
        Self::from_pkcs8_der(&pkcs8)
    }

    /// Reads an unencrypted PKCS#8 `PrivateKeyInfo` (DER). The kind follows
    /// from its algorithm: RSA, EC on P-256 or P-384, or Ed25519.
    pub fn from_pkcs8_der(der: &[u8]) -> anyhow::Result<SigningKeyPair> {
        let kind = pkcs8_kind(der)?;
        let public = match kind {
            KeyKind::Rs256 => {
                let pair = aws_lc_rs::rsa::KeyPair::from_pkcs8(der)
                    .map_err(|e| anyhow::anyhow!("not a usable RSA private key: {e}"))?;
                let public = pair.public_key();
                PublicKey::Rsa {
                    n: public.modulus().big_endian_without_leading_zero().to_vec(),
                    e: public.exponent().big_endian_without_leading_zero().to_vec(),
                }
            }
            KeyKind::Es256 | KeyKind::Es384 => {
                let (curve, name) = ec_curve(kind);
                let pair = EcdsaKeyPair::from_pkcs8(curve, der)
                    .map_err(|e| anyhow::anyhow!("not a usable {name} private key: {e}"))?;
                // Uncompressed SEC1 point: 0x04 || x || y, each coordinate
                // 32 bytes on P-256 and 48 on P-384.
                let point = pair.public_key().as_ref();
                let size = if kind == KeyKind::Es256 { 32 } else { 48 };
                anyhow::ensure!(
                    point.len() == 1 + 2 * size && point[0] == 0x04,
                    "unexpected {name} public key encoding"
                );
                let (x, y) = (point[1..=size].to_vec(), point[1 + size..].to_vec());
                if kind == KeyKind::Es256 {
                    PublicKey::P256 { x, y }
                } else {
                    PublicKey::P384 { x, y }
                }
            }
            KeyKind::EdDsa => {
                let pair = Ed25519KeyPair::from_pkcs8(der)
                    .map_err(|e| anyhow::anyhow!("not a usable Ed25519 private key: {e}"))?;
                let x = pair.public_key().as_ref();
                anyhow::ensure!(x.len() == 32, "unexpected Ed25519 public key length");
                PublicKey::Ed25519 { x: x.to_vec() }
            }
        };
        if kind == KeyKind::Rs256 {
            // Checked here so that signing, which unwraps it, cannot fail later.
            pkcs8_private_key(der).context("RSA PKCS#8 key has an unexpected shape")?;
        }
        Ok(SigningKeyPair {
            kind,
            pkcs8: der.to_vec(),
            public,
            jwk_alg: true,
        })
    }

    /// Reads a PEM file holding one unencrypted PKCS#8 key (`BEGIN PRIVATE
    /// KEY`), as written by [`SigningKeyPair::to_pem`] or by
    /// `openssl genpkey`. Other PEM forms are refused with the command that
    /// converts them.
    pub fn from_pem(text: &str) -> anyhow::Result<SigningKeyPair> {
        use rustls_pemfile::Item;

        if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
            anyhow::bail!(
                "the key is encrypted; decrypt it with `openssl pkcs8 -in KEY -out PLAIN.pem`"
            );
        }
        let mut pkcs8 = Vec::new();
        let mut other = Vec::new();
        for item in rustls_pemfile::read_all(&mut text.as_bytes()) {
            match item.context("malformed PEM")? {
                Item::Pkcs8Key(key) => pkcs8.push(key.secret_pkcs8_der().to_vec()),
                Item::Pkcs1Key(_) => other.push("an RSA PRIVATE KEY (PKCS#1)"),
                Item::Sec1Key(_) => other.push("an EC PRIVATE KEY (SEC1)"),
                Item::X509Certificate(_) => other.push("a certificate"),
                Item::SubjectPublicKeyInfo(_) => other.push("a public key"),
                _ => other.push("a PEM section that is not a private key"),
            }
        }
        match (pkcs8.as_slice(), other.as_slice()) {
            ([der], _) => Self::from_pkcs8_der(der),
            ([], []) => anyhow::bail!("no \"{PEM_LABEL}\" PEM section found"),
            ([], [first, ..]) if first.contains("PRIVATE KEY") => anyhow::bail!(
                "found {first}; convert it to PKCS#8 with \
                 `openssl pkcs8 -topk8 -nocrypt -in KEY -out issuer.pem`"
            ),
            ([], [first, ..]) => {
                anyhow::bail!("found {first}, not a \"{PEM_LABEL}\" (PKCS#8) signing key")
            }
            (many, _) => anyhow::bail!(
                "found {} private keys; put one key in each file",
                many.len()
            ),
        }
    }

    /// Reads a key file (see [`SigningKeyPair::from_pem`]); errors name the file.
    pub fn load(path: &Path) -> anyhow::Result<SigningKeyPair> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the key file {}", path.display()))?;
        Self::from_pem(&text)
            .with_context(|| format!("{} is not a usable signing key", path.display()))
    }

    /// Writes [`SigningKeyPair::to_pem`] to `path`, readable by the owner
    /// only (0600 on Unix). An existing file is an error unless `overwrite`,
    /// so a key that signed live tokens is not lost by accident.
    pub fn save(&self, path: &Path, overwrite: bool) -> anyhow::Result<()> {
        if overwrite {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot replace {}", path.display()));
                }
            }
        }
        let mut options = std::fs::OpenOptions::new();
        // create_new: never follow an existing file or link, never truncate one.
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow::anyhow!("{} already exists", path.display())
            } else {
                anyhow::Error::new(e).context(format!("cannot create {}", path.display()))
            }
        })?;
        file.write_all(self.to_pem().as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// The private key as PKCS#8 PEM (`BEGIN PRIVATE KEY`), which openssl
    /// and most JOSE libraries read.
    pub fn to_pem(&self) -> String {
        let body = STANDARD.encode(&self.pkcs8);
        let mut pem = format!("-----BEGIN {PEM_LABEL}-----\n");
        for line in body.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str(&format!("-----END {PEM_LABEL}-----\n"));
        pem
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The key id: the RFC 7638 SHA-256 JWK thumbprint of the public key,
    /// base64url (43 characters).
    pub fn kid(&self) -> String {
        self.public.thumbprint()
    }

    /// This key, published without `alg` in its JWK, so that verifiers
    /// accept every algorithm that fits the key: for an RSA key, tokens
    /// signed with [`SigningKeyPair::sign_as`] under RS384, PS256 and the rest.
    pub fn without_jwk_alg(mut self) -> SigningKeyPair {
        self.jwk_alg = false;
        self
    }

    /// The public key as a JWK, with `kid`, `use: sig` and `alg` (unless
    /// [`SigningKeyPair::without_jwk_alg`]).
    pub fn public_jwk(&self) -> Value {
        let mut jwk = self.public.members();
        jwk.insert("kid".into(), json!(self.kid()));
        jwk.insert("use".into(), json!("sig"));
        if self.jwk_alg {
            jwk.insert("alg".into(), json!(self.kind.alg_name()));
        }
        Value::Object(jwk)
    }

    /// Signs `claims` exactly as given (nothing is added); the header
    /// carries this key's `alg` and `kid`.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_as(self.kind.algorithm(), claims)
    }

    /// Like [`SigningKeyPair::sign`] but under `alg`, which must fit the key
    /// (see [`KeyKind::signs_as`]): an RSA key signs as any RSA algorithm.
    /// A verifier accepts `alg` other than the kind's own only if the JWK
    /// does not pin it (see [`SigningKeyPair::without_jwk_alg`]).
    ///
    /// Panics if `alg` does not fit the key.
    pub fn sign_as(&self, alg: Algorithm, claims: &Value) -> String {
        assert!(
            self.kind.signs_as(alg),
            "a {} key cannot sign as {alg:?}",
            self.kind.alg_name()
        );
        let mut header = Header::new(alg);
        header.kid = Some(self.kid());
        jsonwebtoken::encode(&header, claims, &self.encoding_key())
            .expect("signing with a checked key failed")
    }

    fn encoding_key(&self) -> EncodingKey {
        match self.kind {
            KeyKind::Rs256 => EncodingKey::from_rsa_der(
                pkcs8_private_key(&self.pkcs8).expect("RSA key shape checked at load"),
            ),
            KeyKind::Es256 | KeyKind::Es384 => EncodingKey::from_ec_der(&self.pkcs8),
            KeyKind::EdDsa => EncodingKey::from_ed_der(&self.pkcs8),
        }
    }
}

/// The aws-lc-rs signing algorithm and the curve name of an ECDSA kind.
fn ec_curve(kind: KeyKind) -> (&'static EcdsaSigningAlgorithm, &'static str) {
    match kind {
        KeyKind::Es384 => (&ECDSA_P384_SHA384_FIXED_SIGNING, "P-384"),
        _ => (&ECDSA_P256_SHA256_FIXED_SIGNING, "P-256"),
    }
}

/// Never shows the private key.
impl fmt::Debug for SigningKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKeyPair")
            .field("kind", &self.kind)
            .field("kid", &self.kid())
            .finish_non_exhaustive()
    }
}

/// A JWKS (`{"keys": [...]}`) publishing `keys` in the given order.
pub fn jwks<'a>(keys: impl IntoIterator<Item = &'a SigningKeyPair>) -> Value {
    let keys: Vec<Value> = keys.into_iter().map(SigningKeyPair::public_jwk).collect();
    json!({ "keys": keys })
}

impl PublicKey {
    /// The JWK members that describe the key itself.
    fn members(&self) -> serde_json::Map<String, Value> {
        let value = match self {
            PublicKey::Rsa { n, e } => json!({ "kty": "RSA", "n": b64(n), "e": b64(e) }),
            PublicKey::P256 { x, y } => {
                json!({ "kty": "EC", "crv": "P-256", "x": b64(x), "y": b64(y) })
            }
            PublicKey::P384 { x, y } => {
                json!({ "kty": "EC", "crv": "P-384", "x": b64(x), "y": b64(y) })
            }
            PublicKey::Ed25519 { x } => json!({ "kty": "OKP", "crv": "Ed25519", "x": b64(x) }),
        };
        match value {
            Value::Object(map) => map,
            _ => unreachable!("json! object literal"),
        }
    }

    /// RFC 7638: SHA-256 over the required members, in lexicographic
    /// order, without whitespace. Written out rather than left to
    /// serde_json, whose map order changes with its `preserve_order`
    /// feature; the values are base64url and need no escaping.
    fn thumbprint(&self) -> String {
        let canonical = match self {
            PublicKey::Rsa { n, e } => {
                format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, b64(e), b64(n))
            }
            PublicKey::P256 { x, y } => format!(
                r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
                b64(x),
                b64(y)
            ),
            PublicKey::P384 { x, y } => format!(
                r#"{{"crv":"P-384","kty":"EC","x":"{}","y":"{}"}}"#,
                b64(x),
                b64(y)
            ),
            PublicKey::Ed25519 { x } => {
                format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, b64(x))
            }
        };
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes());
        b64(digest.as_ref())
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The key kind named by a PKCS#8 `PrivateKeyInfo`'s algorithm identifier.
fn pkcs8_kind(der: &[u8]) -> anyhow::Result<KeyKind> {
    let shape = || "not a PKCS#8 private key";
    let (info, _) = der_element(der, 0x30).context(shape())?;
    let (_version, rest) = der_element(info, 0x02).context(shape())?;
    let (algorithm, _) = der_element(rest, 0x30).context(shape())?;
    let (oid, params) = der_element(algorithm, 0x06).context(shape())?;
    match oid {
        OID_RSA_ENCRYPTION => Ok(KeyKind::Rs256),
        OID_ED25519 => Ok(KeyKind::EdDsa),
        OID_EC_PUBLIC_KEY => {
            let curve = der_element(params, 0x06).map(|(curve, _)| curve).ok();
            match curve {
                Some(OID_P256) => Ok(KeyKind::Es256),
                Some(OID_P384) => Ok(KeyKind::Es384),
                Some(OID_P521) => {
                    anyhow::bail!(
                        "P-521 keys are not supported; use P-256 (ES256) or P-384 (ES384)"
                    )
                }
                _ => {
                    anyhow::bail!("unsupported elliptic curve; use P-256 (ES256) or P-384 (ES384)")
                }
            }
        }
        OID_RSASSA_PSS => {
            anyhow::bail!("RSA-PSS keys are not supported; use a plain RSA key (rsaEncryption)")
        }
        OID_ED448 => anyhow::bail!("Ed448 keys are not supported; use Ed25519"),
        OID_X25519 => anyhow::bail!("X25519 is a key-agreement key and cannot sign; use Ed25519"),
        other => anyhow::bail!(
            "unsupported key algorithm (OID bytes {}); use RSA, EC P-256/P-384 or Ed25519",
            hex::encode(other)
        ),
    }
}

/// The `privateKey` OCTET STRING of a PKCS#8 `PrivateKeyInfo`; for RSA that is
/// the PKCS#1 `RSAPrivateKey` that `EncodingKey::from_rsa_der` expects.
fn pkcs8_private_key(der: &[u8]) -> anyhow::Result<&[u8]> {
    let (info, _) = der_element(der, 0x30)?;
    let (_version, rest) = der_element(info, 0x02)?;
    let (_algorithm, rest) = der_element(rest, 0x30)?;
    let (private_key, _) = der_element(rest, 0x04)?;
    Ok(private_key)
}

/// Splits one DER element with the expected tag off `input`: (contents, rest).
fn der_element(input: &[u8], tag: u8) -> anyhow::Result<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first().context("DER input ended early")?;
    anyhow::ensure!(found == tag, "DER tag {found:#04x}, expected {tag:#04x}");
    let (&first, mut rest) = rest.split_first().context("DER length missing")?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        anyhow::ensure!((1..=4).contains(&count), "unsupported DER length form");
        anyhow::ensure!(rest.len() >= count, "DER length truncated");
        let (bytes, after) = rest.split_at(count);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    anyhow::ensure!(rest.len() >= len, "DER contents truncated");
    Ok(rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::{DecodingKey, Validation, decode, decode_header};

    fn unb64(text: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(text).unwrap()
    }

    #[test]
    fn thumbprint_matches_rfc7638_rsa_example() {
        // RFC 7638 section 3.1.
        let public = PublicKey::Rsa {
            n: unb64(
                "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tS\
                 oc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65Y\
                 GjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdk\
                 t-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            ),
            e: unb64("AQAB"),
        };
        assert_eq!(
            public.thumbprint(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn thumbprint_matches_rfc8037_ed25519_example() {
        // RFC 8037 appendix A.3.
        let public = PublicKey::Ed25519 {
            x: unb64("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"),
        };
        assert_eq!(
            public.thumbprint(),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn pem_round_trip_keeps_kind_kid_and_jwk() {
        for kind in KeyKind::EVERY {
            let key = SigningKeyPair::generate(kind).unwrap();
            let pem = key.to_pem();
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
            assert!(pem.lines().all(|line| line.len() <= 64));
            let loaded = SigningKeyPair::from_pem(&pem).unwrap();
            assert_eq!(loaded.kind(), kind);
            assert_eq!(loaded.kid(), key.kid(), "{kind:?}");
            assert_eq!(loaded.public_jwk(), key.public_jwk());
            assert_eq!(loaded.to_pem(), pem);
            assert_eq!(key.kid().len(), 43);
            // The kid is the thumbprint of exactly the published JWK.
            let jwk: Jwk = serde_json::from_value(key.public_jwk()).unwrap();
            let expected = jwk
                .thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
                .unwrap();
            assert_eq!(key.kid(), expected, "{kind:?}");
        }
        let a = SigningKeyPair::generate(KeyKind::Es256).unwrap();
        let b = SigningKeyPair::generate(KeyKind::Es256).unwrap();
        assert_ne!(a.kid(), b.kid());
    }

    #[test]
    fn loaded_key_signs_tokens_that_verify_against_its_jwk() {
        for kind in KeyKind::EVERY {
            let key = SigningKeyPair::from_pem(&SigningKeyPair::generate(kind).unwrap().to_pem())
                .unwrap();
            let claims = json!({ "sub": "alice", "exp": 4_000_000_000u64, "n": [1, 2] });
            let token = key.sign(&claims);
            let header = decode_header(&token).unwrap();
            assert_eq!(header.alg, kind.algorithm());
            assert_eq!(header.kid.as_deref(), Some(key.kid().as_str()));
            let jwk: Jwk = serde_json::from_value(key.public_jwk()).unwrap();
            let decoding = DecodingKey::from_jwk(&jwk).unwrap();
            let verified = decode::<Value>(&token, &decoding, &Validation::new(kind.algorithm()))
                .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
            assert_eq!(verified.claims, claims);

            let jwk = key.public_jwk();
            assert_eq!(jwk["use"], "sig");
            assert_eq!(jwk["alg"], kind.alg_name());
            assert_eq!(jwk["kid"], key.kid());
            assert!(jwk.get("d").is_none(), "no private member in {jwk}");
        }
    }

    #[test]
    fn jwks_lists_public_keys_in_order() {
        let a = SigningKeyPair::generate(KeyKind::EdDsa).unwrap();
        let b = SigningKeyPair::generate(KeyKind::Es256).unwrap();
        let set = jwks([&a, &b]);
        assert_eq!(set, json!({ "keys": [a.public_jwk(), b.public_jwk()] }));
        serde_json::from_value::<jsonwebtoken::jwk::JwkSet>(set).unwrap();
    }

    #[test]
    fn unsupported_or_malformed_pem_is_refused_clearly() {
        let error = |text: &str| format!("{:#}", SigningKeyPair::from_pem(text).unwrap_err());
        assert!(error("").contains("no \"PRIVATE KEY\""), "{}", error(""));
        assert!(error("hello").contains("no \"PRIVATE KEY\""));

        let pkcs1 = "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        let message = error(pkcs1);
        assert!(
            message.contains("PKCS#1") && message.contains("openssl pkcs8 -topk8"),
            "{message}"
        );

        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert!(error(encrypted).contains("encrypted"));

        let garbage = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(
            error(garbage).contains("not a PKCS#8 private key"),
            "{}",
            error(garbage)
        );

        let key = SigningKeyPair::generate(KeyKind::EdDsa).unwrap().to_pem();
        assert!(error(&format!("{key}{key}")).contains("found 2 private keys"));
    }

    #[test]
    fn other_algorithms_are_named_in_the_error() {
        // PKCS#8 for a P-521 key, generated by aws-lc-rs.
        let p521 = EcdsaKeyPair::generate(&aws_lc_rs::signature::ECDSA_P521_SHA512_FIXED_SIGNING)
            .unwrap()
            .to_pkcs8v1()
            .unwrap();
        let message = format!(
            "{:#}",
            SigningKeyPair::from_pkcs8_der(p521.as_ref()).unwrap_err()
        );
        assert!(
            message.contains("P-521 keys are not supported"),
            "{message}"
        );

        // A well-formed PrivateKeyInfo whose algorithm is Ed448.
        let ed448 = [
            0x30, 0x0b, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x71, 0x04, 0x00,
        ];
        let message = format!("{:#}", SigningKeyPair::from_pkcs8_der(&ed448).unwrap_err());
        assert!(message.contains("Ed448"), "{message}");
    }

    #[test]
    fn save_writes_owner_only_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("issuer.pem");
        let key = SigningKeyPair::generate(KeyKind::Es256).unwrap();
        key.save(&path, false).unwrap();
        assert_eq!(SigningKeyPair::load(&path).unwrap().kid(), key.kid());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let other = SigningKeyPair::generate(KeyKind::Es256).unwrap();
        let message = format!("{:#}", other.save(&path, false).unwrap_err());
        assert!(message.contains("already exists"), "{message}");
        assert_eq!(SigningKeyPair::load(&path).unwrap().kid(), key.kid());

        other.save(&path, true).unwrap();
        assert_eq!(SigningKeyPair::load(&path).unwrap().kid(), other.kid());

        let message = format!(
            "{:#}",
            SigningKeyPair::load(&dir.path().join("none")).unwrap_err()
        );
        assert!(message.contains("cannot read the key file"), "{message}");
    }

    #[test]
    fn debug_hides_the_private_key() {
        let key = SigningKeyPair::generate(KeyKind::EdDsa).unwrap();
        let shown = format!("{key:?}");
        assert!(shown.contains(&key.kid()));
        assert!(!shown.contains(&STANDARD.encode(&key.pkcs8)));
    }

    #[test]
    fn pkcs8_unwrap_rejects_garbage() {
        assert!(pkcs8_private_key(&[]).is_err());
        assert!(pkcs8_private_key(&[0x30, 0x05, 0x02]).is_err());
        assert!(pkcs8_private_key(&[0x04, 0x00]).is_err());
    }

    #[test]
    fn p384_key_publishes_48_byte_coordinates_and_signs_es384() {
        let key = SigningKeyPair::generate(KeyKind::Es384).unwrap();
        let jwk = key.public_jwk();
        assert_eq!(jwk["kty"], "EC");
        assert_eq!(jwk["crv"], "P-384");
        assert_eq!(jwk["alg"], "ES384");
        for coordinate in ["x", "y"] {
            assert_eq!(unb64(jwk[coordinate].as_str().unwrap()).len(), 48);
        }
        let reloaded = SigningKeyPair::from_pem(&key.to_pem()).unwrap();
        assert_eq!(reloaded.kind(), KeyKind::Es384);
        assert_eq!(reloaded.kid(), key.kid());
    }

    #[test]
    fn rsa_key_signs_as_every_rsa_algorithm_and_can_be_published_without_alg() {
        use Algorithm::*;
        let key = SigningKeyPair::generate(KeyKind::Rs256)
            .unwrap()
            .without_jwk_alg();
        let jwk = key.public_jwk();
        assert!(jwk.get("alg").is_none(), "{jwk}");
        let decoding = DecodingKey::from_jwk(&serde_json::from_value::<Jwk>(jwk).unwrap()).unwrap();
        let claims = json!({ "sub": "alice", "exp": 4_000_000_000u64 });
        for alg in [RS256, RS384, RS512, PS256, PS384, PS512] {
            let token = key.sign_as(alg, &claims);
            assert_eq!(decode_header(&token).unwrap().alg, alg);
            let verified = decode::<Value>(&token, &decoding, &Validation::new(alg))
                .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_eq!(verified.claims, claims);
        }
        // The same key without the call still names RS256.
        let pinned = SigningKeyPair::generate(KeyKind::Rs256).unwrap();
        assert_eq!(pinned.public_jwk()["alg"], "RS256");
    }

    #[test]
    fn only_rsa_keys_sign_as_another_algorithm() {
        use Algorithm::*;
        assert!(KeyKind::Rs256.signs_as(PS512));
        assert!(!KeyKind::Rs256.signs_as(ES256));
        assert!(KeyKind::Es384.signs_as(ES384));
        assert!(!KeyKind::Es256.signs_as(ES384));
        assert!(!KeyKind::Es384.signs_as(ES256));
        assert!(!KeyKind::EdDsa.signs_as(RS256));
        let key = SigningKeyPair::generate(KeyKind::Es256).unwrap();
        let refused = std::panic::catch_unwind(|| key.sign_as(ES384, &json!({ "sub": "a" })));
        assert!(refused.is_err());
    }
}
