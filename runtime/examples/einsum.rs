use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::einsum::EinSum;
fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap();
    let mut model = tract_onnx::onnx()
        .model_for_path(format!("{dir}/model.onnx"))?
        .into_typed()?;
    model.declutter()?;
    let mut n = 0;
    for node in model.nodes() {
        if let Some(e) = node.op_as::<EinSum>() {
            if n < 3 || node.name.contains("lm_head") {
                println!(
                    "{} {} q={:?} dt={:?}",
                    node.name, e.axes, e.q_params, e.operating_dt
                );
                for i in &node.inputs {
                    let f = model.outlet_fact(*i)?;
                    println!("   {:?} const={}", f.without_value(), f.konst.is_some());
                }
            }
            n += 1;
        }
    }
    println!("{n} einsums");
    Ok(())
}
