//! Optional compression of frame bodies, chosen per group: none, lz4 (cheap, for fast links)
//! or zstd (denser, for slow WAN links).
//!
//! An encoded body is `[u32 LE decoded length][compressed bytes]`. The decoder checks the
//! declared length against the caller's bound before allocating anything, and checks that the
//! output has exactly that length, so a hostile or corrupt body can neither exhaust memory nor
//! pass off a short result.

use bytes::Bytes;

/// How frame bodies of a group travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Compression {
    #[default]
    None = 0,
    Lz4 = 1,
    Zstd = 2,
}

/// zstd level: 3 is zstd's own default, ~300 MB/s per core here, a good WAN trade-off.
const ZSTD_LEVEL: i32 = 3;

const LENGTH_PREFIX_BYTES: usize = 4;

/// Failure to encode or decode a body.
#[derive(Debug, thiserror::Error)]
pub enum CompressionError {
    #[error("compression: unknown method code {code}")]
    UnknownMethod { code: u8 },
    #[error(
        "compression: {method:?} body of {body_bytes} bytes is shorter than its length prefix"
    )]
    Truncated {
        method: Compression,
        body_bytes: usize,
    },
    #[error("compression: {method:?} body declares {declared_bytes} decoded bytes, more than the bound of {bound_bytes}")]
    TooLarge {
        method: Compression,
        declared_bytes: u64,
        bound_bytes: usize,
    },
    #[error("compression: input of {input_bytes} bytes is too large to encode (4 GiB limit)")]
    InputTooLarge { input_bytes: usize },
    #[error(
        "compression: {method:?} body decoded to {actual_bytes} bytes, declared {declared_bytes}"
    )]
    LengthMismatch {
        method: Compression,
        declared_bytes: usize,
        actual_bytes: usize,
    },
    #[error("compression: lz4 decoding failed: {0}")]
    Lz4(#[from] lz4_flex::block::DecompressError),
    #[error("compression: zstd {operation} failed: {source}")]
    Zstd {
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl TryFrom<u8> for Compression {
    type Error = CompressionError;

    fn try_from(code: u8) -> Result<Compression, CompressionError> {
        match code {
            0 => Ok(Compression::None),
            1 => Ok(Compression::Lz4),
            2 => Ok(Compression::Zstd),
            _ => Err(CompressionError::UnknownMethod { code }),
        }
    }
}

impl Compression {
    /// Encodes `body`. `None` returns the bytes unchanged (no copy when given `Bytes`).
    pub fn encode(self, body: Bytes) -> Result<Bytes, CompressionError> {
        let body_length =
            u32::try_from(body.len()).map_err(|_| CompressionError::InputTooLarge {
                input_bytes: body.len(),
            })?;
        match self {
            Compression::None => Ok(body),
            Compression::Lz4 => {
                let bound = lz4_flex::block::get_maximum_output_size(body.len());
                let mut output = vec![0u8; LENGTH_PREFIX_BYTES + bound];
                output[..LENGTH_PREFIX_BYTES].copy_from_slice(&body_length.to_le_bytes());
                let written =
                    lz4_flex::block::compress_into(&body, &mut output[LENGTH_PREFIX_BYTES..])
                        // The output was sized with lz4's own bound, so this cannot run short.
                        .expect("lz4 output sized by get_maximum_output_size");
                output.truncate(LENGTH_PREFIX_BYTES + written);
                Ok(Bytes::from(output))
            }
            Compression::Zstd => {
                let bound = zstd::zstd_safe::compress_bound(body.len());
                let mut output = Vec::with_capacity(LENGTH_PREFIX_BYTES + bound);
                output.extend_from_slice(&body_length.to_le_bytes());
                let compressed = zstd::bulk::compress(&body, ZSTD_LEVEL).map_err(|source| {
                    CompressionError::Zstd {
                        operation: "compression",
                        source,
                    }
                })?;
                output.extend_from_slice(&compressed);
                Ok(Bytes::from(output))
            }
        }
    }

    /// Decodes `body`, refusing one that would decode to more than `decoded_bytes_max`.
    pub fn decode(self, body: Bytes, decoded_bytes_max: usize) -> Result<Bytes, CompressionError> {
        if self == Compression::None {
            if body.len() > decoded_bytes_max {
                return Err(CompressionError::TooLarge {
                    method: self,
                    declared_bytes: body.len() as u64,
                    bound_bytes: decoded_bytes_max,
                });
            }
            return Ok(body);
        }
        let prefix: [u8; LENGTH_PREFIX_BYTES] = body
            .get(..LENGTH_PREFIX_BYTES)
            .and_then(|slice| slice.try_into().ok())
            .ok_or(CompressionError::Truncated {
                method: self,
                body_bytes: body.len(),
            })?;
        let declared_bytes = u32::from_le_bytes(prefix) as usize;
        if declared_bytes > decoded_bytes_max {
            return Err(CompressionError::TooLarge {
                method: self,
                declared_bytes: declared_bytes as u64,
                bound_bytes: decoded_bytes_max,
            });
        }
        let compressed = &body[LENGTH_PREFIX_BYTES..];
        let actual_bytes;
        let mut output;
        match self {
            Compression::None => unreachable!("handled above"),
            Compression::Lz4 => {
                output = vec![0u8; declared_bytes];
                actual_bytes = lz4_flex::block::decompress_into(compressed, &mut output)?;
            }
            Compression::Zstd => {
                output = Vec::with_capacity(declared_bytes);
                let mut decompressor =
                    zstd::bulk::Decompressor::new().map_err(|source| CompressionError::Zstd {
                        operation: "decompressor setup",
                        source,
                    })?;
                // Decoding into a buffer of the declared capacity: zstd stops with an error
                // rather than write past it.
                actual_bytes = decompressor
                    .decompress_to_buffer(compressed, &mut output)
                    .map_err(|source| CompressionError::Zstd {
                        operation: "decompression",
                        source,
                    })?;
            }
        }
        if actual_bytes != declared_bytes {
            return Err(CompressionError::LengthMismatch {
                method: self,
                declared_bytes,
                actual_bytes,
            });
        }
        output.truncate(actual_bytes);
        Ok(Bytes::from(output))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_body() -> Bytes {
        // Compressible but not trivial: repeated text with a counter.
        let mut body = Vec::new();
        for index in 0..10_000u32 {
            body.extend_from_slice(format!("block {index} of the replica ").as_bytes());
        }
        Bytes::from(body)
    }

    #[test]
    fn every_method_round_trips_and_compresses() {
        let body = sample_body();
        for method in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let encoded = method.encode(body.clone()).unwrap();
            if method != Compression::None {
                assert!(
                    encoded.len() < body.len() / 2,
                    "{method:?}: {}",
                    encoded.len()
                );
            }
            let decoded = method.decode(encoded, body.len()).unwrap();
            assert_eq!(decoded, body, "{method:?}");
            assert_eq!(Compression::try_from(method as u8).unwrap(), method);
        }
        assert!(matches!(
            Compression::try_from(9),
            Err(CompressionError::UnknownMethod { code: 9 })
        ));
        let empty = Compression::Zstd.encode(Bytes::new()).unwrap();
        assert_eq!(Compression::Zstd.decode(empty, 0).unwrap(), Bytes::new());
    }

    #[test]
    fn decode_refuses_bodies_over_the_bound_before_allocating() {
        let body = sample_body();
        for method in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let encoded = method.encode(body.clone()).unwrap();
            let error = method.decode(encoded, body.len() - 1).unwrap_err();
            assert!(
                matches!(error, CompressionError::TooLarge { .. }),
                "{method:?}: {error}"
            );
        }
        // A forged prefix claiming 4 GiB is refused by the bound, not allocated.
        let mut forged = vec![0xff, 0xff, 0xff, 0xff];
        forged.extend_from_slice(b"junk");
        let error = Compression::Lz4
            .decode(Bytes::from(forged), 1 << 20)
            .unwrap_err();
        assert!(error.to_string().contains("more than the bound"), "{error}");
    }

    #[test]
    fn decode_reports_corrupt_and_short_bodies() {
        let body = sample_body();
        for method in [Compression::Lz4, Compression::Zstd] {
            assert!(matches!(
                method.decode(Bytes::from_static(&[1, 0]), 100),
                Err(CompressionError::Truncated { .. })
            ));
            let encoded = method.encode(body.clone()).unwrap();
            // Claim one byte more than the real length: the result must not pass as valid.
            let mut lying = encoded.to_vec();
            lying[..4].copy_from_slice(&(body.len() as u32 + 1).to_le_bytes());
            assert!(
                method.decode(Bytes::from(lying), body.len() + 1).is_err(),
                "{method:?}"
            );
            // Flip bytes in the middle of the compressed data.
            let mut corrupt = encoded.to_vec();
            let middle = corrupt.len() / 2;
            for byte in &mut corrupt[middle..middle + 16] {
                *byte ^= 0x5a;
            }
            if let Ok(decoded) = method.decode(Bytes::from(corrupt), body.len()) {
                // lz4 has no checksum: corruption may decode, but never to the original.
                assert_ne!(decoded, body, "{method:?}");
            }
        }
    }
}
