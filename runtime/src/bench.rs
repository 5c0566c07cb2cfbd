//! `quill bench`: load, prefill and decode timings at fixed lengths, medians of repeated runs.
//!
//! Each run loads and optimizes the bundle afresh, prefills a prompt of exactly
//! `prompt_tokens` tokens and greedily decodes `gen_tokens` more (end-of-sequence tokens are
//! ignored so every run does the same work). Peak RSS is each run's high-water mark (median
//! and highest).
//!
//! Decode speed is also measured after `decode_at` tokens of context (the KV cache's cost), and
//! set against this machine's memory bandwidth, measured in the same run: a STREAM-style triad
//! over buffers far larger than the last-level cache, on as many threads. A decode step reads
//! every weight once, so bandwidth ÷ bytes of weights read per token is decode's speed limit.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::generate::{GenerateOptions, Generator, Step, TokenBuf};
use crate::model::{LoadOptions, Model, OpProfile};
use crate::sampler::SamplingOptions;

/// Text the benchmark prompt is cut from (repeated as needed).
const TEXT: &str = "The lighthouse keeper climbed the stairs every evening to light the lamp. \
The sea below was grey and restless, and the wind carried the smell of salt and rain. He had kept \
the light for thirty years, and in all that time no ship had been lost on the rocks below the \
cliff. ";

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub threads: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub runs: usize,
    /// Also time every operator kind over one prefill and one decode (tract node by node).
    pub profile: bool,
    /// Use quill's int8 and attention kernels ([`LoadOptions::quill_kernels`] and
    /// [`LoadOptions::quill_attention`]).
    pub quill_kernels: bool,
    /// Context lengths after which decoding is also timed ([`DECODE_AT_STEPS`] steps each).
    pub decode_at: Vec<usize>,
    /// The load cache ([`LoadOptions::cache_dir`]); runs after the first find it warm.
    pub cache_dir: Option<std::path::PathBuf>,
    /// The KV cache's number format ([`LoadOptions::kv_cache`]).
    pub kv_cache: crate::attention::KvCacheFormat,
}

/// Decode steps timed at each `decode_at` position.
pub const DECODE_AT_STEPS: usize = 16;

/// Median, minimum and maximum of one measure.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    fn of(mut xs: Vec<f64>) -> Summary {
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        let median = if n % 2 == 1 {
            xs[n / 2]
        } else {
            (xs[n / 2 - 1] + xs[n / 2]) / 2.0
        };
        Summary {
            median,
            min: xs[0],
            max: xs[n - 1],
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub weights: String,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub runs: usize,
    pub load_s: Summary,
    /// Of the load, the integrity checks (sizes, CRC-32s, graph tensors).
    pub checks_ms: Summary,
    /// The load phase by phase (ms), in order, over the runs that had the phase (a warm load
    /// has no parse, a cold one no cache read): (phase, runs, time).
    pub load_phases_ms: Vec<(String, usize, Summary)>,
    /// Runs whose load started from the load cache; `None` without one.
    pub cache_hits: Option<usize>,
    pub time_to_first_token_ms: Summary,
    pub prefill_tokens_per_s: Summary,
    pub decode_tokens_per_s: Summary,
    /// Decode speed after `position` tokens of context.
    pub decode_at: Vec<DecodeAt>,
    /// This machine's memory bandwidth (triad, same threads), GB/s.
    pub bandwidth_gb_s: Summary,
    /// Bytes of weights a decode step reads: every initializer except the embedding table that
    /// is only gathered from (one row per token).
    pub weight_bytes_per_token: u64,
    /// Bandwidth ÷ bytes per token: decode's speed limit, tokens/s.
    pub decode_limit_tokens_per_s: f64,
    /// Median decode ÷ the limit.
    pub decode_fraction_of_limit: f64,
    /// Peak resident memory over this configuration's runs, in MB: the median run's and the
    /// highest (see [`run_side_by_side`]).
    pub peak_rss_mb: Option<Summary>,
    /// With `--profile`: where the time goes, per operator kind.
    pub profile: Option<Profile>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeAt {
    pub position: usize,
    pub tokens_per_s: Summary,
}

/// Time per operator kind for one prefill of the prompt and for decoding, per token.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub prefill: Vec<OpTime>,
    pub decode: Vec<OpTime>,
    /// Wall time of one prefill (ms) and of one decode step (ms), profiled.
    pub prefill_ms: f64,
    pub decode_step_ms: f64,
    /// Decode steps after the longest `decode_at` context the model holds, if any: that
    /// position, the wall time of a step (ms) and its operators.
    pub decode_at: Option<(usize, f64, Vec<OpTime>)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpTime {
    pub op: String,
    /// Milliseconds per prefill, or per decode step.
    pub ms: f64,
    /// Evaluations per prefill, or per decode step.
    pub calls: f64,
    /// Share of the profiled wall time.
    pub share: f64,
}

fn op_times(p: &OpProfile) -> Vec<OpTime> {
    let runs = p.runs.max(1) as f64;
    let total = p.total.as_secs_f64();
    p.sorted()
        .into_iter()
        .map(|(op, d, n)| OpTime {
            op: op.to_string(),
            ms: d.as_secs_f64() * 1e3 / runs,
            calls: n as f64 / runs,
            share: d.as_secs_f64() / total,
        })
        .collect()
}

/// Profiles one prefill of `prompt` (timed per run of all its chunks) and `gen` decode steps,
/// then (with `at`) [`DECODE_AT_STEPS`] decode steps after `at` tokens of context.
fn profile(
    model: &Model,
    prompt: &[u32],
    steps: usize,
    at: Option<usize>,
) -> anyhow::Result<Profile> {
    let mut s = model.session()?;
    let mut pre = OpProfile::default();
    s.forward_profiled(prompt, &mut pre)?;
    pre.runs = 1; // one prefill, whatever its number of chunks
    let mut dec = OpProfile::default();
    for i in 0..steps {
        s.forward_profiled(&prompt[i % prompt.len()..][..1], &mut dec)?;
    }
    drop(s);
    let decode_at = match at {
        Some(position) => {
            let context: Vec<u32> = prompt.iter().copied().cycle().take(position).collect();
            let mut s = model.session()?;
            s.forward_last(&context)?;
            let mut p = OpProfile::default();
            for i in 0..DECODE_AT_STEPS {
                s.forward_profiled(&prompt[i % prompt.len()..][..1], &mut p)?;
            }
            let ms = p.total.as_secs_f64() * 1e3 / DECODE_AT_STEPS as f64;
            Some((position, ms, op_times(&p)))
        }
        None => None,
    };
    Ok(Profile {
        prefill_ms: pre.total.as_secs_f64() * 1e3,
        decode_step_ms: dec.total.as_secs_f64() * 1e3 / steps as f64,
        prefill: op_times(&pre),
        decode: op_times(&dec),
        decode_at,
    })
}

/// Decode speed (tokens/s) over [`DECODE_AT_STEPS`] steps after `position` tokens of context.
fn decode_after(model: &Model, text: &[u32], position: usize) -> anyhow::Result<f64> {
    let context: Vec<u32> = text.iter().copied().cycle().take(position).collect();
    let mut s = model.session()?;
    if !context.is_empty() {
        s.forward_last(&context)?;
    }
    let t0 = Instant::now();
    for i in 0..DECODE_AT_STEPS {
        let token = text[i % text.len()];
        s.forward_last(&[token])?;
    }
    Ok(DECODE_AT_STEPS as f64 / t0.elapsed().as_secs_f64())
}

/// A STREAM-style triad `a = b + s·c` over three 64 MB f32 arrays on `threads` threads; GB/s
/// counted as STREAM does (two reads and a write per element). Best of 3 passes after a warm-up.
/// The arrays are in huge pages where the system gives them, as quill's packed weights are
/// ([`crate::arena`]): the limit is what memory gives a stream with few TLB misses, not one
/// slowed by page walks that decode does not pay.
pub fn triad_gb_s(threads: usize) -> f64 {
    const N: usize = 16 << 20; // 16 Mi floats = 64 MB per array
    let threads = threads.max(1);
    let arrays = |fill: f32| {
        let mut w = crate::arena::Weights::alone(N * 4).ok()?;
        let v = w.as_f32_mut()?;
        v.fill(fill);
        Some(w)
    };
    let (Some(mut wa), Some(mut wb), Some(mut wc)) = (arrays(0.0), arrays(1.0), arrays(2.0)) else {
        return 0.0;
    };
    let (a, b, c) = (
        wa.as_f32_mut().expect("aligned"),
        &*wb.as_f32_mut().expect("aligned"),
        &*wc.as_f32_mut().expect("aligned"),
    );
    let chunk = N.div_ceil(threads);
    let mut best = 0f64;
    for pass in 0..4 {
        let t0 = Instant::now();
        std::thread::scope(|scope| {
            for ((a, b), c) in a
                .chunks_mut(chunk)
                .zip(b.chunks(chunk))
                .zip(c.chunks(chunk))
            {
                scope.spawn(move || {
                    for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                        *a = b + 3.0 * c;
                    }
                });
            }
        });
        let gb_s = (3 * N * 4) as f64 / t0.elapsed().as_secs_f64() / 1e9;
        if pass > 0 {
            best = best.max(gb_s);
        }
    }
    std::hint::black_box(&a);
    best
}

/// Bytes of weights one decode step reads: every initializer of the graph, except a table that
/// only feeds `Gather` (the embedding, of which a step reads one row).
pub fn weight_bytes_per_token(dir: &Path) -> anyhow::Result<u64> {
    use prost::Message;
    let path = dir.join(crate::bundle::GRAPH_FILE);
    let proto = tract_onnx::pb::ModelProto::decode(std::fs::read(&path)?.as_slice())?;
    let graph = proto
        .graph
        .ok_or_else(|| anyhow::anyhow!("{} holds no graph", path.display()))?;
    let gathered_only = |name: &str| {
        let mut uses = graph
            .node
            .iter()
            .flat_map(|n| n.input.iter().enumerate().map(move |(i, x)| (n, i, x)))
            .filter(|(_, _, x)| x.as_str() == name)
            .peekable();
        uses.peek().is_some() && uses.all(|(n, i, _)| n.op_type == "Gather" && i == 0)
    };
    let mut bytes = 0u64;
    for t in &graph.initializer {
        if gathered_only(&t.name) {
            continue;
        }
        let length = t
            .external_data
            .iter()
            .find(|e| e.key == "length")
            .and_then(|e| e.value.parse().ok());
        bytes += length.unwrap_or(t.raw_data.len() as u64);
    }
    Ok(bytes)
}

/// Resets the kernel's record of the peak resident set size (Linux 4.0 and later); false if
/// the system refuses.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's peak resident set size (`VmHWM`), in MB; Linux only.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn run(dir: &Path, opts: &BenchOptions) -> anyhow::Result<BenchReport> {
    Ok(run_side_by_side(dir, std::slice::from_ref(opts))?.remove(0))
}

/// Several configurations (for instance 1 and 2 threads) measured side by side: run `r` of
/// every configuration happens before run `r + 1` of any, so a slow spell of a shared machine
/// falls on all of them alike. Peak RSS is each run's own: before each run the heap's free pages
/// go back to the system and the kernel's high-water mark is reset (`/proc/self/clear_refs`);
/// where that reset is refused, it is the process's over every run.
pub fn run_side_by_side(dir: &Path, configs: &[BenchOptions]) -> anyhow::Result<Vec<BenchReport>> {
    anyhow::ensure!(!configs.is_empty(), "nothing to measure");
    let runs = configs[0].runs;
    anyhow::ensure!(runs >= 1, "--runs must be at least 1");
    let mut acc: Vec<Runs> = configs.iter().map(|_| Runs::default()).collect();
    for run in 0..runs {
        for (opts, acc) in configs.iter().zip(&mut acc) {
            crate::model::trim_heap();
            let reset = reset_peak_rss();
            one_run(dir, opts, run + 1 == runs, acc)?;
            // The peak RSS is the model's: read before the triad allocates its 192 MB.
            match (reset, peak_rss_mb()) {
                (true, Some(p)) => acc.peak_rss_mb.push(p),
                // No reset: the process's peak, whichever configuration reached it.
                (false, Some(p)) => acc.process_peak_rss_mb = Some(p),
                (_, None) => {}
            }
        }
    }
    let weight_bytes_per_token = weight_bytes_per_token(dir)?;
    configs
        .iter()
        .zip(acc)
        .map(|(opts, acc)| {
            let peak = match acc.process_peak_rss_mb {
                Some(p) => Some(Summary::of(vec![p])),
                None if acc.peak_rss_mb.is_empty() => None,
                None => Some(Summary::of(acc.peak_rss_mb.clone())),
            };
            summarize(opts, acc, peak, weight_bytes_per_token)
        })
        .collect()
}

/// What the runs of one configuration measured.
#[derive(Default)]
struct Runs {
    load: Vec<f64>,
    ttft: Vec<f64>,
    prefill: Vec<f64>,
    decode: Vec<f64>,
    checks: Vec<f64>,
    cache_hits: usize,
    phases: Vec<(String, Vec<f64>)>,
    at: Vec<Vec<f64>>,
    header: Option<(String, String)>,
    prof: Option<Profile>,
    /// Each run's peak (MB), where the kernel's high-water mark could be reset.
    peak_rss_mb: Vec<f64>,
    /// Otherwise the process's.
    process_peak_rss_mb: Option<f64>,
}

/// One run: load, prefill, decode, decode at each position; with `last`, the profile too.
fn one_run(dir: &Path, opts: &BenchOptions, last: bool, acc: &mut Runs) -> anyhow::Result<()> {
    anyhow::ensure!(
        opts.prompt_tokens >= 1 && opts.gen_tokens >= 2,
        "need at least 1 prompt token and 2 generated tokens"
    );
    acc.at.resize(opts.decode_at.len(), vec![]);
    let t0 = Instant::now();
    let model = Model::load(
        dir,
        &LoadOptions {
            threads: opts.threads,
            verify: true,
            quill_kernels: opts.quill_kernels,
            quill_attention: opts.quill_kernels,
            return_memory: true,
            context: None,
            cache_dir: opts.cache_dir.clone(),
            kv_cache: opts.kv_cache,
            all_logits: false,
        },
    )?;
    acc.cache_hits += usize::from(model.cache == crate::cache::CacheUse::Hit);
    acc.load.push(t0.elapsed().as_secs_f64());
    acc.checks.push(model.check_time.as_secs_f64() * 1e3);
    for (name, d) in &model.load_phases {
        let i = match acc.phases.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                acc.phases.push((name.to_string(), vec![]));
                acc.phases.len() - 1
            }
        };
        acc.phases[i].1.push(d.as_secs_f64() * 1e3);
    }
    let m = model.manifest();
    anyhow::ensure!(
        opts.prompt_tokens + opts.gen_tokens <= m.context_length,
        "{} prompt + {} generated tokens exceed the {}-token context",
        opts.prompt_tokens,
        opts.gen_tokens,
        m.context_length
    );
    acc.header
        .get_or_insert_with(|| (m.name.clone(), m.weights.clone()));
    let base = model.tokenizer.encode(TEXT, false);
    let prompt: Vec<u32> = base
        .iter()
        .copied()
        .cycle()
        .take(opts.prompt_tokens)
        .collect();
    let mut session = model.session()?;
    let mut history = TokenBuf::new();
    let gen_opts = GenerateOptions {
        sampling: SamplingOptions::greedy(),
        max_tokens: opts.gen_tokens,
        stop: vec![],
    };
    let mut g = Generator::new(
        &mut session,
        &model.tokenizer,
        &[],
        &mut history,
        &prompt,
        &gen_opts,
    )?;
    while let Step::Text(_) = g.step()? {}
    let s = g.stats();
    acc.ttft.push(s.time_to_first_token.as_secs_f64() * 1e3);
    acc.prefill.push(s.prefill_tokens_per_s());
    acc.decode.push(s.decode_tokens_per_s());
    for (i, &position) in opts.decode_at.iter().enumerate() {
        if position + DECODE_AT_STEPS <= model.context {
            acc.at[i].push(decode_after(&model, &base, position)?);
        }
    }
    if opts.profile && last {
        let at = opts
            .decode_at
            .iter()
            .copied()
            .filter(|&p| p > 0 && p + DECODE_AT_STEPS <= model.context)
            .max();
        acc.prof = Some(profile(&model, &prompt, opts.gen_tokens, at)?);
    }
    Ok(())
}

/// Medians and the bandwidth limit of one configuration's runs.
fn summarize(
    opts: &BenchOptions,
    acc: Runs,
    peak_rss_mb: Option<Summary>,
    weight_bytes_per_token: u64,
) -> anyhow::Result<BenchReport> {
    let (model, weights) = acc.header.expect("at least one run");
    let decode_at = opts
        .decode_at
        .iter()
        .zip(acc.at)
        .filter(|(_, xs)| !xs.is_empty())
        .map(|(&position, xs)| DecodeAt {
            position,
            tokens_per_s: Summary::of(xs),
        })
        .collect();
    let bandwidth = Summary::of((0..opts.runs).map(|_| triad_gb_s(opts.threads)).collect());
    let limit = bandwidth.median * 1e9 / weight_bytes_per_token as f64;
    let decode = Summary::of(acc.decode);
    Ok(BenchReport {
        decode_at,
        decode_fraction_of_limit: decode.median / limit,
        decode_limit_tokens_per_s: limit,
        bandwidth_gb_s: bandwidth,
        weight_bytes_per_token,
        model,
        weights,
        threads: opts.threads,
        prompt_tokens: opts.prompt_tokens,
        gen_tokens: opts.gen_tokens,
        runs: opts.runs,
        load_s: Summary::of(acc.load),
        checks_ms: Summary::of(acc.checks),
        cache_hits: opts.cache_dir.is_some().then_some(acc.cache_hits),
        load_phases_ms: acc
            .phases
            .into_iter()
            .map(|(n, xs)| (n, xs.len(), Summary::of(xs)))
            .collect(),
        time_to_first_token_ms: Summary::of(acc.ttft),
        prefill_tokens_per_s: Summary::of(acc.prefill),
        decode_tokens_per_s: decode,
        peak_rss_mb,
        profile: acc.prof,
    })
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} ({}), {} thread(s), prompt {} tokens, {} generated, {} runs: median [min – max]",
            self.model, self.weights, self.threads, self.prompt_tokens, self.gen_tokens, self.runs
        )?;
        let row = |f: &mut std::fmt::Formatter<'_>, name: &str, s: &Summary, unit: &str| {
            writeln!(
                f,
                "  {name:<22} {:>9.2} {unit:<9} [{:.2} – {:.2}]",
                s.median, s.min, s.max
            )
        };
        row(f, "load + optimize", &self.load_s, "s")?;
        if let Some(h) = self.cache_hits {
            writeln!(
                f,
                "    load cache: {h} of {} runs started from it",
                self.runs
            )?;
        }
        for (name, runs, s) in &self.load_phases_ms {
            if *runs == self.runs {
                row(f, &format!("  {name}"), s, "ms")?;
            } else {
                row(f, &format!("  {name} ({runs} runs)"), s, "ms")?;
            }
        }
        row(f, "time to first token", &self.time_to_first_token_ms, "ms")?;
        row(f, "prefill", &self.prefill_tokens_per_s, "tokens/s")?;
        row(f, "decode", &self.decode_tokens_per_s, "tokens/s")?;
        for d in &self.decode_at {
            row(
                f,
                &format!("decode at {}", d.position),
                &d.tokens_per_s,
                "tokens/s",
            )?;
        }
        // How much a long context slows decoding: the last position against the first.
        if let [first, .., last] = &self.decode_at[..] {
            writeln!(
                f,
                "  {:<22} {:>9.0}%         (ratio of the medians)",
                format!("at {} / at {}", last.position, first.position),
                100.0 * last.tokens_per_s.median / first.tokens_per_s.median
            )?;
        }
        row(f, "memory bandwidth", &self.bandwidth_gb_s, "GB/s")?;
        writeln!(
            f,
            "  {:<22} {:>9.1} tokens/s  ({:.1} MB of weights per token); decode is {:.0}% of it",
            "decode limit",
            self.decode_limit_tokens_per_s,
            self.weight_bytes_per_token as f64 / 1e6,
            self.decode_fraction_of_limit * 100.0
        )?;
        match &self.peak_rss_mb {
            Some(mb) => writeln!(
                f,
                "  {:<22} {:>9.0} MB        [{:.0} – {:.0}]",
                "peak RSS", mb.median, mb.min, mb.max
            )?,
            None => writeln!(f, "  peak RSS               unavailable on this system")?,
        }
        if let Some(p) = &self.profile {
            let at = p
                .decode_at
                .as_ref()
                .map(|(pos, ms, ops)| (format!("decode step at {pos}"), *ms, ops));
            for (what, ms, ops) in [
                ("prefill".to_string(), p.prefill_ms, &p.prefill),
                ("decode step".to_string(), p.decode_step_ms, &p.decode),
            ]
            .into_iter()
            .chain(at)
            {
                writeln!(f, "  profile: one {what}, {ms:.2} ms")?;
                for o in ops.iter().take(12) {
                    writeln!(
                        f,
                        "    {:<28} {:>9.3} ms {:>5.1}% {:>7.0} calls",
                        o.op,
                        o.ms,
                        o.share * 100.0,
                        o.calls
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// The second report's medians against the first's (`quill bench --compare-threads`).
pub struct Comparison<'a>(pub &'a BenchReport, pub &'a BenchReport);

impl std::fmt::Display for Comparison<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (a, b) = (self.0, self.1);
        writeln!(
            f,
            "{} thread(s) against {} (ratio of medians; above 1: faster)",
            b.threads, a.threads
        )?;
        let mut ratio = |name: &str, x: &Summary, y: &Summary| {
            writeln!(f, "  {name:<22} {:>9.2}×", y.median / x.median)
        };
        ratio("prefill", &a.prefill_tokens_per_s, &b.prefill_tokens_per_s)?;
        ratio("decode", &a.decode_tokens_per_s, &b.decode_tokens_per_s)?;
        for (x, y) in a.decode_at.iter().zip(&b.decode_at) {
            ratio(
                &format!("decode at {}", x.position),
                &x.tokens_per_s,
                &y.tokens_per_s,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_median_min_max() {
        let s = Summary::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Summary::of(vec![4.0, 1.0, 2.0, 3.0]).median, 2.5);
    }

    #[test]
    fn the_report_shows_the_long_context_share() {
        let s = |x: f64| Summary::of(vec![x]);
        let at = |position, x| DecodeAt {
            position,
            tokens_per_s: s(x),
        };
        let mut r = BenchReport {
            model: "m".into(),
            weights: "int8".into(),
            threads: 1,
            prompt_tokens: 128,
            gen_tokens: 32,
            runs: 1,
            load_s: s(0.3),
            checks_ms: s(1.0),
            load_phases_ms: vec![],
            cache_hits: None,
            time_to_first_token_ms: s(100.0),
            prefill_tokens_per_s: s(1000.0),
            decode_tokens_per_s: s(100.0),
            decode_at: vec![at(32, 120.0), at(512, 110.0), at(1024, 96.0)],
            bandwidth_gb_s: s(20.0),
            weight_bytes_per_token: 100_000_000,
            decode_limit_tokens_per_s: 200.0,
            decode_fraction_of_limit: 0.5,
            peak_rss_mb: None,
            profile: None,
        };
        let text = r.to_string();
        assert!(text.contains("at 1024 / at 32               80%"), "{text}");
        // One position: nothing to compare.
        r.decode_at.truncate(1);
        assert!(!r.to_string().contains(" / at "));
    }
}
