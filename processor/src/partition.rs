//! Which partition a customer belongs to: the hash Kafka's default partitioner (the Java
//! client's, and librdkafka's `murmur2_random`) applies to a record's key, so that a Kafka
//! partition of a topic keyed by customer id and an engine partition hold the same customers.
//! The sharded engine (issue #17) and scale-out (#21) stand on this.

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`): 32-bit MurmurHash2 with
/// Kafka's seed, over the key's bytes.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len() as u32;
    let mut h = SEED ^ length;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if let Some(&first) = tail.first() {
        h ^= u32::from(first);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `key` among `partitions` (at least 1): `toPositive(murmur2(key)) %
/// partitions`, as Kafka's default partitioner computes it for a keyed record.
pub fn partition_of(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "at least one partition");
    ((murmur2(key) & 0x7fff_ffff) as u32) % partitions
}

/// FNV-1a, 64 bits: a hash that is the same in every process and build (unlike std's),
/// for what nodes compare or rank alike.
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kafka's own test vectors for `Utils.murmur2` (clients' UtilsTest).
    #[test]
    fn murmur2_matches_kafka() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key), expected, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn partitions_are_in_range_and_spread() {
        let mut counts = [0u32; 6];
        for i in 0..60_000 {
            counts[partition_of(format!("1380000{i:04}").as_bytes(), 6) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }
}
