//! Legacy TensorRT INT8 calibration cache (the text file `IInt8Calibrator::writeCalibrationCache` produces), for
//! TensorRT ≤ 10 users running an fp16/fp32 graph with implicit INT8. TensorRT 11 removed implicit INT8: QDQ graphs
//! ([`crate::qdq`]) are the way forward, and a QDQ graph must not be given a cache.
//!
//! Layout, one entry per line, `\n` line ends:
//! ```text
//! TRT-<version>-EntropyCalibration2
//! <tensor name>: <8 lowercase hex digits: IEEE-754 bits of the f32 scale = amax / 127>
//! ```
use crate::error::{CalibError, Result};
use crate::quant::{scale_from_amax, INT8_QMAX};

/// The calibrator named in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheAlgorithm {
    /// `EntropyCalibration2` (TensorRT's default entropy calibrator).
    Entropy2,
    /// `MinMaxCalibration`.
    MinMax,
}

impl CacheAlgorithm {
    /// The header suffix.
    pub fn header_name(self) -> &'static str {
        match self {
            CacheAlgorithm::Entropy2 => "EntropyCalibration2",
            CacheAlgorithm::MinMax => "MinMaxCalibration",
        }
    }
}

/// A parsed or to-be-written calibration cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationCache {
    /// TensorRT version string as it appears in the header (e.g. `8601`, `100300`).
    pub version: String,
    /// The calibrator.
    pub algorithm: CacheAlgorithm,
    /// `(tensor name, scale)` in file order.
    pub entries: Vec<(String, f32)>,
}

/// The 8 lowercase hex digits TensorRT writes for a scale.
pub fn scale_hex(scale: f32) -> String {
    format!("{:08x}", scale.to_bits())
}

impl CalibrationCache {
    /// Builds a cache from `(tensor name, amax)` pairs, with `scale = amax / 127`.
    pub fn from_amax(version: &str, algorithm: CacheAlgorithm, amax: &[(String, f32)]) -> Result<Self> {
        validate_version(version, 1)?;
        let entries = amax
            .iter()
            .map(|(n, a)| {
                if n.is_empty() || n.contains('\n') {
                    return Err(CalibError::invalid(
                        "cache tensor name",
                        "non-empty, without newlines",
                        format!("{n:?}"),
                    ));
                }
                Ok((n.clone(), scale_from_amax(*a, INT8_QMAX)?))
            })
            .collect::<Result<_>>()?;
        Ok(CalibrationCache { version: version.to_string(), algorithm, entries })
    }

    /// The cache file's text.
    pub fn to_text(&self) -> String {
        let mut s = format!("TRT-{}-{}\n", self.version, self.algorithm.header_name());
        for (name, scale) in &self.entries {
            s.push_str(name);
            s.push_str(": ");
            s.push_str(&scale_hex(*scale));
            s.push('\n');
        }
        s
    }

    /// Parses a cache file's text. Names may contain `:`; the scale follows the last `": "`.
    pub fn parse(text: &str) -> Result<Self> {
        let mut lines = text.lines().enumerate();
        let header = lines.next().map(|(_, l)| l.trim_end_matches('\r')).unwrap_or_default();
        let bad_header = || CalibError::CacheFormat {
            line: 1,
            problem: format!("expected `TRT-<version>-EntropyCalibration2` or `-MinMaxCalibration`, got {header:?}"),
        };
        let rest = header.strip_prefix("TRT-").ok_or_else(bad_header)?;
        let (version, algo) = rest.split_once('-').ok_or_else(bad_header)?;
        let algorithm = match algo {
            "EntropyCalibration2" => CacheAlgorithm::Entropy2,
            "MinMaxCalibration" => CacheAlgorithm::MinMax,
            _ => return Err(bad_header()),
        };
        validate_version(version, 1)?;
        let mut entries = Vec::new();
        for (i, line) in lines {
            let line = line.trim_end_matches('\r');
            if line.is_empty() {
                continue;
            }
            let bad = |problem: String| CalibError::CacheFormat { line: i + 1, problem };
            let (name, hex) = line
                .rsplit_once(": ")
                .ok_or_else(|| bad(format!("expected `<tensor>: <8 hex digits>`, got {line:?}")))?;
            if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!("scale of `{name}` must be 8 hex digits, got {hex:?}")));
            }
            let bits = u32::from_str_radix(hex, 16).map_err(|e| bad(e.to_string()))?;
            entries.push((name.to_string(), f32::from_bits(bits)));
        }
        Ok(CalibrationCache { version: version.to_string(), algorithm, entries })
    }
}

fn validate_version(v: &str, line: usize) -> Result<()> {
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.') {
        Ok(())
    } else {
        Err(CalibError::CacheFormat { line, problem: format!("TensorRT version must be alphanumeric, got {v:?}") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        assert_eq!(scale_hex(1.0), "3f800000");
        assert_eq!(scale_hex(0.5), "3f000000");
        assert_eq!(scale_hex(-2.0), "c0000000");
        assert_eq!(scale_hex(1.0 / 127.0), "3c010204");
    }

    #[test]
    fn exact_layout() {
        let c = CalibrationCache::from_amax(
            "8601",
            CacheAlgorithm::Entropy2,
            &[("input_ids:0".into(), 127.0), ("/model/layers.0/MatMul_output_0".into(), 63.5)],
        )
        .unwrap();
        assert_eq!(
            c.to_text(),
            "TRT-8601-EntropyCalibration2\ninput_ids:0: 3f800000\n/model/layers.0/MatMul_output_0: 3f000000\n"
        );
        let back = CalibrationCache::parse(&c.to_text()).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.entries[0].0, "input_ids:0", "names with ':' survive");
        let m = CalibrationCache::from_amax("10", CacheAlgorithm::MinMax, &[]).unwrap();
        assert_eq!(m.to_text(), "TRT-10-MinMaxCalibration\n");
    }

    #[test]
    fn errors_name_line_and_problem() {
        let e = CalibrationCache::parse("TRT-8601-Legacy\n").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("Legacy"), "{e}");
        let e = CalibrationCache::parse("TRT-8601-EntropyCalibration2\nx: 3f80\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("8 hex digits") && e.contains("3f80"), "{e}");
        let e = CalibrationCache::parse("TRT-8601-EntropyCalibration2\nno separator\n").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(CalibrationCache::from_amax("8 6", CacheAlgorithm::MinMax, &[]).is_err());
        assert!(CalibrationCache::from_amax("86", CacheAlgorithm::MinMax, &[("a".into(), -1.0)]).is_err());
    }

    proptest! {
        #[test]
        fn roundtrip(names in prop::collection::vec("[a-zA-Z0-9_./:]{1,20}", 0..10), amax in prop::collection::vec(0f32..1e4, 10)) {
            let pairs: Vec<(String, f32)> = names.into_iter().zip(amax).collect();
            let c = CalibrationCache::from_amax("100300", CacheAlgorithm::Entropy2, &pairs).unwrap();
            let back = CalibrationCache::parse(&c.to_text()).unwrap();
            prop_assert_eq!(&back, &c);
            for ((_, a), (_, s)) in pairs.iter().zip(&back.entries) {
                prop_assert_eq!(*s, scale_from_amax(*a, 127.0).unwrap());
            }
        }
    }
}
