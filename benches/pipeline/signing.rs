//! `--signing`: what a signature costs walhook per request, by scheme and during a rotation's
//! grace period (two signatures), against one `v1` HMAC as the reference, in one process.
//! No database: signing is pure CPU on the request path.

use std::time::{Duration, Instant, SystemTime};

use walhook::security::secrets::{Scheme, SigningSecret};
use walhook::security::sign::Signer;

/// Requests signed per case.
const ROUNDS: u32 = 200_000;

fn time(signer: &Signer, body: &[u8], rounds: u32) -> Duration {
    let start = Instant::now();
    let mut len = 0;
    for i in 0..rounds {
        len += signer.sign("4fdd2c4e-d263-86be-a11f-5dc288e421f0", 1_764_270_145 + i64::from(i), body).len();
    }
    assert!(len > 0);
    start.elapsed()
}

/// Prints µs per request for each case and its ratio to one `v1` signature.
pub fn run(smoke: bool) -> anyhow::Result<()> {
    let rounds = if smoke { ROUNDS / 100 } else { ROUNDS };
    let body = vec![b'x'; 1024];
    let until = SystemTime::now() + Duration::from_secs(3600);
    let v1 = Signer::new(&SigningSecret::generate())?;
    let v1a = Signer::new(&SigningSecret::generate_for(Scheme::V1a))?;
    let cases = [
        ("v1 (reference)", v1.clone()),
        ("v1 during a rotation (2 signatures)", v1.clone().with_previous(&SigningSecret::generate(), until)?),
        ("v1a (ed25519)", v1a.clone()),
        (
            "v1a during a rotation (2 signatures)",
            v1a.clone().with_previous(&SigningSecret::generate_for(Scheme::V1a), until)?,
        ),
    ];
    time(&v1, &body, rounds / 10); // warm up
    let reference = time(&v1, &body, rounds).as_secs_f64();
    println!("signing a 1 KiB body, {rounds} requests per case");
    println!("| case | µs per request | × v1 |");
    println!("|---|---|---|");
    for (name, signer) in &cases {
        let t = time(signer, &body, rounds).as_secs_f64();
        println!("| {name} | {:.2} | {:.2} |", t * 1e6 / f64::from(rounds), t / reference);
    }
    Ok(())
}
