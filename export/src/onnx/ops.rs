//! One-call helpers for the ONNX ops the decoder graphs use. Each takes the node name and input
//! names and returns the output name; ops whose signature changed across opsets 17..=21
//! (`ReduceMean` axes became an input in 18) are emitted for the builder's opset.

use super::builder::GraphBuilder;
use super::proto::{attr_i, attr_ints, attr_t, inline_tensor};
use super::ElemType;
use crate::error::Result;

impl GraphBuilder {
    /// `MatMul(a, b)`.
    pub fn matmul(&mut self, name: &str, a: &str, b: &str) -> Result<String> {
        self.wire(name, "MatMul", &[a, b], vec![])
    }
    /// `Add(a, b)`.
    pub fn add(&mut self, name: &str, a: &str, b: &str) -> Result<String> {
        self.wire(name, "Add", &[a, b], vec![])
    }
    /// `Sub(a, b)`.
    pub fn sub(&mut self, name: &str, a: &str, b: &str) -> Result<String> {
        self.wire(name, "Sub", &[a, b], vec![])
    }
    /// `Mul(a, b)`.
    pub fn mul(&mut self, name: &str, a: &str, b: &str) -> Result<String> {
        self.wire(name, "Mul", &[a, b], vec![])
    }
    /// `Div(a, b)`.
    pub fn div(&mut self, name: &str, a: &str, b: &str) -> Result<String> {
        self.wire(name, "Div", &[a, b], vec![])
    }
    /// Any single-input, attribute-free op (`Sqrt`, `Neg`, `Sigmoid`, `Cos`, `Sin`, `Shape`, `Not`, ...).
    pub fn unary(&mut self, name: &str, op: &str, x: &str) -> Result<String> {
        self.wire(name, op, &[x], vec![])
    }
    /// `Cast(x, to)`.
    pub fn cast(&mut self, name: &str, x: &str, to: ElemType) -> Result<String> {
        self.wire(name, "Cast", &[x], vec![attr_i("to", to.onnx_code() as i64)])
    }
    /// `Reshape(x, shape)` with a constant target shape (0 copies the input dim, -1 infers one).
    pub fn reshape(&mut self, name: &str, x: &str, shape: &[i64]) -> Result<String> {
        let s = self.const_i64s(shape)?;
        self.wire(name, "Reshape", &[x, &s], vec![])
    }
    /// `Transpose(x, perm)`.
    pub fn transpose(&mut self, name: &str, x: &str, perm: &[i64]) -> Result<String> {
        self.wire(name, "Transpose", &[x], vec![attr_ints("perm", perm)])
    }
    /// `Unsqueeze(x, axes)` (axes as an input, opset 13+).
    pub fn unsqueeze(&mut self, name: &str, x: &str, axes: &[i64]) -> Result<String> {
        let a = self.const_i64s(axes)?;
        self.wire(name, "Unsqueeze", &[x, &a], vec![])
    }
    /// `Concat(xs, axis)`.
    pub fn concat(&mut self, name: &str, xs: &[&str], axis: i64) -> Result<String> {
        self.wire(name, "Concat", xs, vec![attr_i("axis", axis)])
    }
    /// `Split(x, split, axis)` into `split.len()` outputs (split sizes as an input, opset 13+).
    pub fn split(&mut self, name: &str, x: &str, split: &[i64], axis: i64) -> Result<Vec<String>> {
        let s = self.const_i64s(split)?;
        self.wire_n(name, "Split", &[x, &s], vec![attr_i("axis", axis)], split.len())
    }
    /// `Softmax(x, axis)`.
    pub fn softmax(&mut self, name: &str, x: &str, axis: i64) -> Result<String> {
        self.wire(name, "Softmax", &[x], vec![attr_i("axis", axis)])
    }
    /// `Gather(data, indices, axis)`.
    pub fn gather(&mut self, name: &str, data: &str, indices: &str, axis: i64) -> Result<String> {
        self.wire(name, "Gather", &[data, indices], vec![attr_i("axis", axis)])
    }
    /// `Where(cond, a, b)`.
    pub fn where_(&mut self, name: &str, cond: &str, a: &str, b: &str) -> Result<String> {
        self.wire(name, "Where", &[cond, a, b], vec![])
    }
    /// `Range(start, limit, delta)`.
    pub fn range(&mut self, name: &str, start: &str, limit: &str, delta: &str) -> Result<String> {
        self.wire(name, "Range", &[start, limit, delta], vec![])
    }
    /// `ReduceMean(x, axes, keepdims)`, attribute form before opset 18 and input form from 18.
    pub fn reduce_mean(&mut self, name: &str, x: &str, axes: &[i64], keepdims: bool) -> Result<String> {
        let keep = attr_i("keepdims", keepdims as i64);
        if self.opset() < 18 {
            self.wire(name, "ReduceMean", &[x], vec![attr_ints("axes", axes), keep])
        } else {
            let a = self.const_i64s(axes)?;
            self.wire(name, "ReduceMean", &[x, &a], vec![keep])
        }
    }
    /// `Gather(Shape(x), index)`: one dimension of `x` as an int64 scalar.
    pub fn dim_of(&mut self, name: &str, x: &str, index: i64) -> Result<String> {
        let shape = self.unary(&format!("{name}/Shape"), "Shape", x)?;
        let i = self.const_i64(index)?;
        self.gather(&format!("{name}/Gather"), &shape, &i, 0)
    }
    /// `ConstantOfShape(shape)` filled with a scalar of type `elem`.
    pub fn constant_of_shape(&mut self, name: &str, shape: &str, elem: ElemType, value: f32) -> Result<String> {
        let raw = match elem {
            ElemType::F32 | ElemType::F16 => elem.encode_f32(&[value])?,
            ElemType::I64 => (value as i64).to_le_bytes().to_vec(),
            _ => vec![value as u8],
        };
        let t = inline_tensor("value", elem, &[1], raw);
        self.wire(name, "ConstantOfShape", &[shape], vec![attr_t("value", t)])
    }
}

#[cfg(test)]
mod tests {
    use super::super::builder::GraphBuilder;
    use r1_engine::manifest::{DType, Dim};

    #[test]
    fn reduce_mean_follows_opset() {
        for (opset, inputs) in [(17, 1), (18, 2), (21, 2)] {
            let mut b = GraphBuilder::new(opset, None).unwrap();
            let x = b.input("x", DType::Float32, vec![Dim::Fixed(2)]);
            let y = b.reduce_mean("/m", &x, &[-1], true).unwrap();
            b.output(&y, DType::Float32, vec![Dim::Fixed(1)]);
            let (m, _) = b.finish("g", "").unwrap();
            let node = &m.graph.unwrap().node[0];
            assert_eq!(node.input.len(), inputs, "opset {opset}");
        }
    }

    #[test]
    fn constants_are_deduplicated_and_nodes_unique() {
        let mut b = GraphBuilder::new(17, None).unwrap();
        let a = b.const_i64s(&[1, 2]).unwrap();
        let c = b.const_i64s(&[1, 2]).unwrap();
        let d = b.const_i64s(&[2, 1]).unwrap();
        assert_eq!(a, c);
        assert_ne!(a, d);
        b.add("/x", &a, &d).unwrap();
        assert!(b.add("/x", &a, &d).is_err());
    }

    #[test]
    fn dangling_inputs_and_outputs_are_refused() {
        let mut b = GraphBuilder::new(17, None).unwrap();
        b.unary("/n", "Neg", "nowhere").unwrap();
        assert!(b.finish("g", "").unwrap_err().to_string().contains("nowhere"));
        let mut b = GraphBuilder::new(17, None).unwrap();
        b.output("ghost", DType::Float32, vec![]);
        assert!(b.finish("g", "").unwrap_err().to_string().contains("ghost"));
        assert!(GraphBuilder::new(16, None).err().map(|e| e.to_string()).unwrap_or_default().contains("got 16"));
    }
}
