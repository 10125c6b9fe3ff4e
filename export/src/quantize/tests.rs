//! Unit tests of the quantized export's option checks and accuracy gate.
use super::*;

fn report(fp32: u32, quant: u32) -> QualityReport {
    let row = |precision: &str, correct| AccuracyRow { precision: precision.into(), correct, total: 500 };
    QualityReport {
        precision: "int8".into(),
        method: None,
        smoothquant_alpha: 0.0,
        samples: 0,
        tokens: None,
        kept_float: Vec::new(),
        left_float: Vec::new(),
        layers: Vec::new(),
        end_to_end: None,
        accuracy: vec![row("fp32", fp32), row("int8", quant)],
    }
}

#[test]
fn the_accuracy_gate_names_both_figures_and_the_limit() {
    let mut q = QuantizeOptions::new(Precision::Int8);
    q.max_accuracy_loss = Some(1.0);
    // 468 → 465 of 500 is 0.6 points: passes; 468 → 455 is 2.6: fails.
    check_accuracy_loss(&report(468, 465), &q).unwrap();
    let e = check_accuracy_loss(&report(468, 455), &q).unwrap_err();
    assert_eq!(e.kind(), "accuracy_loss");
    let e = e.to_string();
    assert!(
        e.contains("93.6% (468/500)")
            && e.contains("91.0% (455/500)")
            && e.contains("2.6 points")
            && e.contains("the 1 allowed")
            && e.contains("no artifact"),
        "{e}"
    );
    q.max_accuracy_loss = None;
    check_accuracy_loss(&report(468, 0), &q).unwrap();
}

#[test]
fn the_gate_and_keep_float_are_checked_before_any_work() {
    let opts = ExportOptions::new(Path::new("ck"), Path::new("out"));
    let mut q = QuantizeOptions::new(Precision::Int8WeightOnly);
    q.max_accuracy_loss = Some(1.0);
    let e = validate(&opts, &q).unwrap_err().to_string();
    assert!(e.contains("--max-accuracy-loss") && e.contains("--eval-problems"), "{e}");
    q.eval_problems = Some("p.jsonl".into());
    q.max_accuracy_loss = Some(-1.0);
    assert!(validate(&opts, &q).unwrap_err().to_string().contains("got -1"));

    let mut model = ModelProto::default();
    let graph = model.graph.get_or_insert_with(Default::default);
    graph.node.push(r1_proto::onnx::NodeProto {
        name: Some("/model/layers.0/mlp/gate/MatMul".into()),
        op_type: Some("MatMul".into()),
        input: vec!["x".into(), "gate.weight".into()],
        ..Default::default()
    });
    graph.initializer.push(r1_proto::onnx::TensorProto {
        name: Some("model.layers.1.mlp.gate.weight".into()),
        ..Default::default()
    });
    let mut q = QuantizeOptions::new(Precision::Int8WeightOnly);
    let routers_only = qdq_options(&q, &model).unwrap().exclude;
    assert_eq!(routers_only.into_iter().collect::<Vec<_>>(), ["model.layers.1.mlp.gate.weight"], "MoE routers");
    q.keep_float = vec!["/model/layers.0/mlp/gate/MatMul".into()];
    assert!(qdq_options(&q, &model).unwrap().exclude.contains("gate.weight"));
    q.keep_float = vec!["gate.weight".into()];
    assert!(qdq_options(&q, &model).unwrap().exclude.contains("gate.weight"));
    q.keep_float = vec!["gate".into()];
    let e = qdq_options(&q, &model).unwrap_err().to_string();
    assert!(e.contains("`gate` names no MatMul") && e.contains("/model/layers.0/mlp/gate/MatMul"), "{e}");
}

#[test]
fn streaming_is_for_weight_only_forms_that_need_no_fp32_model() {
    let wo = |p| QuantizeOptions::new(p);
    assert!(stream::streamable(&wo(Precision::Int8WeightOnly)));
    assert!(stream::streamable(&wo(Precision::Int4WeightOnly)));
    assert!(!stream::streamable(&wo(Precision::Int8)), "W8A8 calibrates on the fp32 graph");
    let needs_fp32: [&dyn Fn(&mut QuantizeOptions); 4] = [
        &|q| q.calibration_data = Some("c.jsonl".into()),
        &|q| q.eval_problems = Some("p.jsonl".into()),
        &|q| q.keep_float = vec!["/lm_head/MatMul".into()],
        &|q| q.staged = true,
    ];
    for (i, tune) in needs_fp32.iter().enumerate() {
        let mut q = wo(Precision::Int4WeightOnly);
        tune(&mut q);
        assert!(!stream::streamable(&q), "case {i} streams");
    }
}
