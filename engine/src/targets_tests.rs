//! Pins the target table and its mapping to ONNX Runtime's TensorRT options.

use super::*;
use crate::manifest::Manifest;

fn manifest(precision: &str) -> Manifest {
    let text = include_str!("../tests/fixtures/tiny/manifest.json");
    let mut m: Manifest = serde_json::from_str(text).expect("fixture manifest parses");
    m.precision = precision.parse().expect("a precision name");
    m
}

fn settings() -> TrtSettings {
    TrtSettings {
        cache_dir: PathBuf::from("/art/engines/a100"),
        hardware_compatible: false,
        dump_ep_context_model: true,
        builder_optimization_level: 3,
    }
}

fn get<'a>(opts: &'a [(String, String)], key: &str) -> &'a str {
    opts.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("option {key} missing"))
}

#[test]
fn table_has_every_target_with_its_capabilities() {
    let names: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
    assert_eq!(names, ["a100", "h100", "h200", "b200", "l40s", "l4", "a10g", "t4", "cpu"]);
    let a100 = target("a100").unwrap();
    assert_eq!((a100.sm, a100.fp16, a100.bf16, a100.int8, a100.fp8), (80, true, true, true, false));
    for n in ["h100", "h200"] {
        let t = target(n).unwrap();
        assert_eq!((t.sm, t.fp8), (90, true));
    }
    assert_eq!(target("l40s").unwrap().sm, 89);
    assert_eq!(target("l4").unwrap().sm, 89);
    assert_eq!(target("a10g").unwrap().sm, 86);
    let t4 = target("t4").unwrap();
    assert_eq!((t4.sm, t4.fp16, t4.bf16, t4.int8, t4.fp8), (75, true, false, true, false));
    assert_eq!(target("b200").unwrap().sm, 100);
    assert!(target("cpu").unwrap().is_cpu());
    for t in TARGETS {
        let p = t.profile;
        for d in [p.batch, p.sequence, p.past] {
            assert!(d.min <= d.opt && d.opt <= d.max, "{}: {d:?}", t.name);
        }
        assert!(t.supports(t.default_precision), "{} default {}", t.name, t.default_precision);
    }
    let err = target("v100").unwrap_err().to_string();
    assert!(err.contains("a100") && err.contains("`v100`"), "{err}");
}

#[test]
fn gpu_names_map_to_targets() {
    let cases = [
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA A10G", "a10g"),
        ("Tesla T4", "t4"),
        ("NVIDIA B200", "b200"),
    ];
    for (gpu, want) in cases {
        assert_eq!(target_for_gpu_name(gpu).map(|t| t.name), Some(want), "{gpu}");
    }
    assert_eq!(target_for_gpu_name("NVIDIA GeForce RTX 4090"), None);
}

#[test]
fn a100_fp16_maps_to_documented_trt_options() {
    let opts = tensorrt_options(target("a100").unwrap(), &manifest("fp16"), &settings()).unwrap();
    let keys: Vec<&str> = opts.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "trt_fp16_enable",
            "trt_bf16_enable",
            "trt_int8_enable",
            "trt_engine_cache_enable",
            "trt_engine_cache_path",
            "trt_timing_cache_enable",
            "trt_timing_cache_path",
            "trt_profile_min_shapes",
            "trt_profile_opt_shapes",
            "trt_profile_max_shapes",
            "trt_engine_hw_compatible",
            "trt_builder_optimization_level",
            "trt_max_workspace_size",
            "trt_dump_ep_context_model",
            "trt_ep_context_file_path",
            "trt_ep_context_embed_mode",
        ]
    );
    assert_eq!(get(&opts, "trt_fp16_enable"), "1");
    assert_eq!(get(&opts, "trt_bf16_enable"), "0");
    assert_eq!(get(&opts, "trt_int8_enable"), "0");
    assert_eq!(get(&opts, "trt_engine_cache_path"), "/art/engines/a100");
    assert_eq!(get(&opts, "trt_engine_hw_compatible"), "0");
    assert_eq!(get(&opts, "trt_max_workspace_size"), (8u64 << 30).to_string());
    assert_eq!(get(&opts, "trt_ep_context_file_path"), "/art/engines/a100/model_ctx.onnx");
    assert_eq!(get(&opts, "trt_ep_context_embed_mode"), "0");
    // Every dynamic input, `name:AxB` in graph order; total = past + sequence.
    let kv = |p: usize| {
        (0..2)
            .flat_map(move |i| ["key", "value"].map(move |k| format!("past_key_values.{i}.{k}:{}x2x{p}x16", "{b}")))
            .collect::<Vec<_>>()
    };
    let expect = |b: usize, s: usize, p: usize| {
        let mut v = vec![
            format!("input_ids:{b}x{s}"),
            format!("attention_mask:{b}x{}", p + s),
            format!("position_ids:{b}x{s}"),
        ];
        v.extend(kv(p).into_iter().map(|x| x.replace("{b}", &b.to_string())));
        v.join(",")
    };
    assert_eq!(get(&opts, "trt_profile_min_shapes"), expect(1, 1, 0));
    assert_eq!(get(&opts, "trt_profile_opt_shapes"), expect(8, 1, 1024));
    assert_eq!(get(&opts, "trt_profile_max_shapes"), expect(64, 2048, 8192));
}

#[test]
fn precision_flags_follow_the_manifest() {
    let flags = |t: &str, p: &str| {
        let o = tensorrt_options(target(t).unwrap(), &manifest(p), &settings()).unwrap();
        (
            get(&o, "trt_fp16_enable").to_string(),
            get(&o, "trt_bf16_enable").to_string(),
            get(&o, "trt_int8_enable").to_string(),
        )
    };
    let f = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(flags("a100", "fp32"), f("0", "0", "0"));
    assert_eq!(flags("a100", "fp16"), f("1", "0", "0"));
    assert_eq!(flags("a100", "int8"), f("1", "0", "1"));
    assert_eq!(flags("t4", "int4-wo"), f("1", "0", "0"));
    assert_eq!(flags("t4", "int8-wo"), f("1", "0", "0"));
}

#[test]
fn every_gpu_target_runs_every_precision_and_cpu_is_refused() {
    for t in TARGETS.iter().filter(|t| !t.is_cpu()) {
        for p in Precision::ALL {
            assert!(t.supports(*p), "{} {p}", t.name);
        }
    }
    let e = tensorrt_options(target("cpu").unwrap(), &manifest("fp32"), &settings()).unwrap_err().to_string();
    assert!(e.contains("GPU target, got `cpu`"), "{e}");
}

#[test]
fn hardware_compatible_and_cache_settings_pass_through() {
    let mut s = TrtSettings::for_artifact(Path::new("/out"), target("h100").unwrap());
    s.hardware_compatible = true;
    s.dump_ep_context_model = false;
    s.builder_optimization_level = 5;
    let o = tensorrt_options(target("h100").unwrap(), &manifest("fp16"), &s).unwrap();
    assert_eq!(get(&o, "trt_engine_cache_path"), "/out/engines/h100");
    assert_eq!(get(&o, "trt_timing_cache_path"), "/out/engines/h100");
    assert_eq!(get(&o, "trt_engine_hw_compatible"), "1");
    assert_eq!(get(&o, "trt_builder_optimization_level"), "5");
    assert!(o.iter().all(|(k, _)| k != "trt_dump_ep_context_model" && k != "trt_ep_context_embed_mode"));
}

/// A build plan as the exporter records it: options with cache paths relative to the artifact.
fn plan(m: &Manifest, t: &Target, hardware_compatible: bool) -> EngineBuild {
    let settings = TrtSettings {
        cache_dir: PathBuf::from(format!("engines/{}", t.name)),
        hardware_compatible,
        dump_ep_context_model: true,
        builder_optimization_level: 3,
    };
    let options = tensorrt_options(t, m, &settings).unwrap().into_iter().collect();
    EngineBuild {
        target: t.name.into(),
        sm: t.sm,
        hardware_compatible,
        precision: Some(m.precision),
        options,
        ..EngineBuild::default()
    }
}

#[test]
fn a_built_engine_is_opened_with_the_options_it_was_built_with() {
    let dir = Path::new("/srv/art");
    let h100 = target("h100").unwrap();
    let mut m = manifest("fp16");
    // Built --hardware-compatible: the server asks for no hardware compatibility, the record wins.
    let mut built = plan(&m, h100, true);
    built.built = true;
    m.targets.set_tensorrt(built.clone());
    let (cache, o) = session_tensorrt_options(dir, &m, h100, false, None).unwrap();
    assert_eq!(cache, dir.join("engines/h100"));
    assert_eq!(get(&o, "trt_engine_hw_compatible"), "1");
    assert_eq!(get(&o, "trt_engine_cache_path"), "/srv/art/engines/h100");
    assert_eq!(get(&o, "trt_timing_cache_path"), "/srv/art/engines/h100");
    assert_eq!(get(&o, "trt_ep_context_file_path"), "/srv/art/engines/h100/model_ctx.onnx");
    assert_eq!(o.len(), built.options.len(), "exactly the recorded options");
    for (k, v) in &built.options {
        if !k.ends_with("_path") {
            assert_eq!(get(&o, k), v, "{k}");
        }
    }
    // A cache folder given at load moves every path with it.
    let (_, o) = session_tensorrt_options(dir, &m, h100, false, Some(Path::new("/cache/h100"))).unwrap();
    assert_eq!(get(&o, "trt_ep_context_file_path"), "/cache/h100/model_ctx.onnx");
    // No built record: computed from the table and the flag (a plan's hardware compatibility is kept).
    let m = manifest("fp16");
    let (_, o) = session_tensorrt_options(dir, &m, h100, false, None).unwrap();
    assert_eq!(get(&o, "trt_engine_hw_compatible"), "0");
    let mut planned = m.clone();
    planned.targets.set_tensorrt(plan(&m, h100, true));
    let (_, o) = session_tensorrt_options(dir, &planned, h100, false, None).unwrap();
    assert_eq!(get(&o, "trt_engine_hw_compatible"), "1");
}

/// `r1-export build` writes engines into versioned folders (`engines/<target>/<version>/`, export's build_lock):
/// the session opens the folder the record names, and a cache folder given at load stands for that folder.
#[test]
fn a_versioned_engine_is_opened_from_its_own_folder() {
    let dir = Path::new("/srv/art");
    let h100 = target("h100").unwrap();
    let mut m = manifest("fp16");
    let settings = TrtSettings {
        cache_dir: PathBuf::from("engines/h100/0123456789abcdef"),
        hardware_compatible: false,
        dump_ep_context_model: true,
        builder_optimization_level: 3,
    };
    let mut built = plan(&m, h100, false);
    built.options = tensorrt_options(h100, &m, &settings).unwrap().into_iter().collect();
    built.built = true;
    m.targets.set_tensorrt(built);
    let (cache, o) = session_tensorrt_options(dir, &m, h100, false, None).unwrap();
    assert_eq!(cache, dir.join("engines/h100/0123456789abcdef"));
    assert_eq!(get(&o, "trt_engine_cache_path"), "/srv/art/engines/h100/0123456789abcdef");
    assert_eq!(get(&o, "trt_ep_context_file_path"), "/srv/art/engines/h100/0123456789abcdef/model_ctx.onnx");
    let (cache, o) = session_tensorrt_options(dir, &m, h100, false, Some(Path::new("/cache/h100"))).unwrap();
    assert_eq!(cache, Path::new("/cache/h100"));
    assert_eq!(get(&o, "trt_ep_context_file_path"), "/cache/h100/model_ctx.onnx");
}

#[test]
fn unknown_symbolic_dim_is_an_error_naming_it() {
    let mut m = manifest("fp16");
    m.inputs[0].shape[1] = Dim::Symbolic("tokens".into());
    let e = profile_shapes(target("a100").unwrap(), &m).unwrap_err().to_string();
    assert!(e.contains("input_ids") && e.contains("`tokens`"), "{e}");
}

#[test]
fn nvidia_smi_and_proc_parsing() {
    let g = parse_nvidia_smi("NVIDIA A100-SXM4-80GB, 8.0\nNVIDIA A100-SXM4-80GB, 8.0\n").unwrap();
    assert_eq!(g, LocalGpu { name: "NVIDIA A100-SXM4-80GB".into(), sm: Some(80) });
    let g = parse_nvidia_smi("Tesla T4, [N/A]\n").unwrap();
    assert_eq!(g.sm, Some(75));
    assert_eq!(parse_nvidia_smi("\n"), None);
    let info = "Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   35\nGPU UUID: GPU-x\n";
    assert_eq!(parse_proc_information(info).unwrap(), LocalGpu { name: "NVIDIA H100 80GB HBM3".into(), sm: Some(90) });
}

#[test]
fn wrong_gpu_engine_is_refused_unless_hardware_compatible() {
    let a100 = LocalGpu { name: "NVIDIA A100-SXM4-80GB".into(), sm: Some(80) };
    let t4 = LocalGpu { name: "Tesla T4".into(), sm: Some(75) };
    let built = |hw| EngineBuild {
        target: "h100".into(),
        sm: 90,
        hardware_compatible: hw,
        built: true,
        ..EngineBuild::default()
    };
    let e = check_engine_host(&built(false), Some(&a100)).unwrap_err().to_string();
    assert!(
        e.contains("`h100` (sm90)") && e.contains("NVIDIA A100-SXM4-80GB") && e.contains("--hardware-compatible"),
        "{e}"
    );
    check_engine_host(&built(true), Some(&a100)).unwrap();
    assert!(check_engine_host(&built(true), Some(&t4)).is_err(), "hardware compatibility needs sm80+");
    let same = EngineBuild {
        target: "a100".into(),
        sm: 80,
        hardware_compatible: false,
        built: true,
        ..EngineBuild::default()
    };
    check_engine_host(&same, Some(&a100)).unwrap();
    let e = check_engine_host(&same, None).unwrap_err().to_string();
    assert!(e.contains("no NVIDIA GPU was found"), "{e}");
}

#[test]
fn int4_with_zero_points_is_refused_for_tensorrt_and_symmetric_int4_is_not() {
    let int4 = |asymmetric: bool| {
        let mut m = manifest("int4-wo");
        m.quantization = Some(serde_json::json!({
            "precision": "int4-wo",
            "scheme": {"Int4WeightOnly": {"block_size": 32, "asymmetric": asymmetric}},
        }));
        m
    };
    assert!(!int4(false).int4_zero_points() && int4(true).int4_zero_points());
    assert!(tensorrt_options(target("a100").unwrap(), &int4(false), &settings()).is_ok());
    let e = tensorrt_options(target("a100").unwrap(), &int4(true), &settings()).unwrap_err().to_string();
    assert!(e.contains("zero points") && e.contains("--int4-scheme symmetric") && e.contains("a100"), "{e}");
}

#[test]
fn missing_library_names_the_library_the_loader_cannot_open() {
    let missing = missing_library(&["libc.so.6", "libr1-no-such-library.so.10"]).expect("the second cannot load");
    assert!(missing.starts_with("libr1-no-such-library.so.10 ("), "{missing}");
    assert_eq!(missing_library(&["libc.so.6"]), None);
    assert_eq!(TENSORRT_LIBRARIES, ["libnvinfer.so.10", "libnvonnxparser.so.10"]);
}
