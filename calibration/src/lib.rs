//! r1-calibration: INT8 calibration and quantization (issue 5). Not built yet.
