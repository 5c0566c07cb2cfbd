//! Lists the optimized graph's operators, with counts and the biggest constants.
use std::collections::BTreeMap;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or("models/bundles/smollm2-135m-instruct-int8".into());
    let m = quill::Model::load(std::path::Path::new(&dir), &quill::LoadOptions::default())?;
    let model = m.typed_model();
    let mut ops = BTreeMap::<String, usize>::new();
    for n in model.nodes() {
        *ops.entry(n.op.name().to_string()).or_default() += 1;
    }
    for (k, v) in ops {
        println!("{v:5} {k}");
    }
    for n in model
        .nodes()
        .iter()
        .filter(|n| n.name.contains("lm_head") || n.name.contains("layers.0."))
        .take(40)
    {
        println!("{} {} {:?}", n.name, n.op.name(), n.outputs[0].fact);
    }
    Ok(())
}
