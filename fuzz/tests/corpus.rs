//! Replays the committed corpus (and a slice of deterministic noise) through every fuzz body.
//! This runs on stable in CI; `cargo fuzz run --features libfuzzer <target>` explores further.

use std::path::Path;

#[test]
fn every_target_has_a_corpus_and_survives_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut total = 0;
    for (name, body) in warren_fuzz::TARGETS {
        let dir = root.join(name);
        let entries: Vec<_> = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).collect();
        assert!(!entries.is_empty(), "empty corpus for {name}");
        for entry in entries {
            let path = entry.expect("entry").path();
            let data = std::fs::read(&path).expect("read");
            body(&data);
            // Every prefix, as a stream cut short would present it.
            for cut in (0..data.len()).step_by(data.len() / 64 + 1) {
                body(&data[..cut]);
            }
            total += 1;
        }
    }
    assert!(total >= warren_fuzz::TARGETS.len());
}

#[test]
fn deterministic_noise_never_panics() {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for (_, body) in warren_fuzz::TARGETS {
        for len in 0..400 {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            body(&data);
        }
    }
}
