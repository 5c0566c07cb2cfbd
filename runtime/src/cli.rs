//! The `quill` command line: `generate`, `chat`, `info`, `bench`, `eval`, `serve`, `client`.
//!
//! Generated text goes to stdout as it is produced; statistics and errors go to stderr
//! (or, with `--json`, one JSON object to stdout at the end).

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::board::{Board, MemoryEstimate};
use crate::bundle::{self, Bundle};
use crate::chat::ChatFormat;
use crate::generate::{GenerateOptions, Generator, Stats, StopReason, TokenBuf};
use crate::model::{Decoder, LoadOptions, Model};
use crate::sampler::SamplingOptions;

#[derive(Parser, Debug)]
#[command(
    name = "quill",
    version,
    about = "On-device text generation with tract"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Continue a prompt, streaming the text to stdout
    Generate(GenerateArgs),
    /// Talk with the model in its chat template (one message per line; /reset, /quit)
    Chat(ChatArgs),
    /// Describe a model bundle
    Info(InfoArgs),
    /// Measure load, prefill and decode speed and peak memory (medians of repeated runs)
    Bench(BenchArgs),
    /// Perplexity on a text file, and top-1 agreement with another bundle
    Eval(EvalArgs),
    /// Print the token ids of a text (one JSON array), for checking the tokenizer
    Tokenize(TokenizeArgs),
    /// Serve the model over a serial line: to a person at a terminal, or in the binary protocol
    Serve(ServeArgs),
    /// Talk to `quill serve --mode binary` over a serial line (ping, info, generate)
    Client(ClientArgs),
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("line").required(true).args(["serial", "pty", "stdio"])))]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// A serial device: /dev/serial0 (a Pi's UART), /dev/ttyUSB0, /dev/ttyTHS1 (a Jetson)
    #[arg(long)]
    pub serial: Option<PathBuf>,
    /// Create a pseudo-terminal and print its path on stdout (open it with picocom or screen)
    #[arg(long)]
    pub pty: bool,
    /// Serve on standard input and output
    #[arg(long)]
    pub stdio: bool,
    /// Line speed of --serial (8N1); with --pty, recorded in the terminal's settings only (a PTY
    /// is not paced)
    #[arg(long, default_value_t = 115200)]
    pub baud: u32,
    /// Hardware flow control (RTS/CTS) on --serial
    #[arg(long)]
    pub rtscts: bool,
    /// text: a person at a terminal; binary: the quill-protocol frames of a microcontroller
    #[arg(long, value_enum, default_value = "text")]
    pub mode: ModeArg,
    /// A file that takes 1 and 0 to switch the status LED (on while generating), e.g.
    /// /sys/class/leds/ACT/brightness
    #[arg(long)]
    pub status_led: Option<PathBuf>,
    /// Seconds a write may wait on a stalled line before the peer counts as gone (0 = forever)
    #[arg(long, default_value_t = 30.0)]
    pub write_timeout: f64,
    /// System message for chat (replaces the template's default)
    #[arg(long)]
    pub system: Option<String>,
    /// Do not log connections and errors to stderr
    #[arg(long)]
    pub quiet: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeArg {
    Text,
    Binary,
}

#[derive(Args, Debug)]
pub struct ClientArgs {
    /// The serial device the server listens on (for `quill serve --pty`, the path it printed)
    #[arg(long)]
    pub serial: PathBuf,
    #[arg(long, default_value_t = 115200)]
    pub baud: u32,
    #[arg(long)]
    pub rtscts: bool,
    /// Seconds to wait for each answer from the server
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
    /// Ping the server and print the round-trip time
    #[arg(long)]
    pub ping: bool,
    /// Print what the server runs
    #[arg(long)]
    pub info: bool,
    /// Clear the server's conversation first
    #[arg(long)]
    pub reset: bool,
    /// Send the prompt as the next chat message (the conversation continues) instead of plain text
    #[arg(long)]
    pub chat: bool,
    /// Sampling options (the server's settings when absent)
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_k: Option<u16>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub max_tokens: Option<u16>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print one JSON object (text and statistics) instead of streaming
    #[arg(long)]
    pub json: bool,
    /// The prompt
    pub prompt: Option<String>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length in tokens
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens generated after the prompt
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Runs (each loads the model afresh); medians are reported
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
    /// Also show where the time goes, per operator kind (one extra profiled run)
    #[arg(long)]
    pub profile: bool,
    /// Also time decoding after this many tokens of context (comma-separated; positions the
    /// context cannot hold are skipped)
    #[arg(long, value_delimiter = ',', default_value = "32,1024")]
    pub decode_at: Vec<usize>,
    /// Also measure with this many threads, runs alternating with `--threads`' (side by side,
    /// in one process), and print the ratios
    #[arg(long)]
    pub compare_threads: Option<usize>,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A UTF-8 text file
    #[arg(long)]
    pub text: PathBuf,
    /// Also run this bundle and report how often both predict the same next token
    #[arg(long)]
    pub against: Option<PathBuf>,
    /// Tokens per window (each window is one fresh sequence; at most the model's context)
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Tokens between window starts (each window scores its last `stride` tokens)
    #[arg(long, default_value_t = 256)]
    pub stride: usize,
    /// Score at most this many tokens (0 = all)
    #[arg(long, default_value_t = 0)]
    pub max_tokens: usize,
    /// prefill: each window in one batch; decode: one token at a time through the KV cache
    #[arg(long, default_value = "prefill", value_parser = ["prefill", "decode"])]
    pub mode: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Match special-token text such as <|im_start|>
    #[arg(long)]
    pub special: bool,
    /// The text; read from stdin when absent or "-"
    pub text: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model bundle directory [default: $QUILL_MODEL or models/bundles/smollm2-135m-instruct-int8]
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// Threads for tract's matrix products [default: the board's, else 1]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Leave int8 matrix products and attention to tract's kernels instead of quill's (for
    /// comparisons)
    #[arg(long)]
    pub tract_kernels: bool,
    /// The board quill runs on (rpi-zero-2w, rpi3, rpi4, rpi5, jetson-nano, jetson-orin-nano, or
    /// a board file): default threads and context, and a bundle that does not fit its memory
    /// budget is refused [default: $QUILL_BOARD]
    #[arg(long)]
    pub board: Option<String>,
    /// Most tokens a conversation holds (the KV cache grows with each) [default: the board's,
    /// else the bundle's]
    #[arg(long)]
    pub context: Option<usize>,
    /// Load from the ONNX graph every time: neither read nor write the load cache
    /// ($QUILL_CACHE_DIR, else ~/.cache/quill/plans), which makes later loads of the same
    /// bundle several times faster
    #[arg(long)]
    pub no_cache: bool,
    /// Number format of the KV cache: f16 halves its memory and what a decode step reads from
    /// it, int8 quarters them (faster in long conversations, and a longer context in the same
    /// memory), each at a small cost in accuracy (perplexity in BENCHMARKS.md)
    #[arg(long, value_enum, default_value_t = KvCacheFormat::F32)]
    pub kv_cache: KvCacheFormat,
}

pub use crate::attention::KvCacheFormat;

/// What `ModelArgs` resolve to once the board is read and the bundle's needs checked.
#[derive(Debug)]
pub struct Resolved {
    pub dir: PathBuf,
    pub board: Option<Board>,
    pub options: LoadOptions,
    pub estimate: MemoryEstimate,
}

impl ModelArgs {
    /// The KV cache's format as the model will hold it: `--kv-cache` applies to quill's
    /// attention only; with `--tract-kernels` tract keeps an f32 cache.
    pub fn cache_format(&self) -> KvCacheFormat {
        if self.tract_kernels {
            KvCacheFormat::F32
        } else {
            self.kv_cache
        }
    }

    fn dir(&self) -> PathBuf {
        self.model
            .clone()
            .unwrap_or_else(bundle::default_bundle_dir)
    }

    fn board(&self) -> Result<Option<Board>> {
        let name = self
            .board
            .clone()
            .or_else(|| std::env::var("QUILL_BOARD").ok().filter(|b| !b.is_empty()));
        Ok(match name {
            Some(n) => Some(Board::load(&n)?),
            None => None,
        })
    }

    /// Reads the board and the bundle's manifest, and refuses a bundle that does not fit the
    /// board's memory budget, before anything large is loaded.
    pub fn resolve(&self) -> Result<Resolved> {
        let dir = self.dir();
        let board = self.board()?;
        let threads = self
            .threads
            .or(board.as_ref().map(|b| b.threads))
            .unwrap_or(1);
        if threads == 0 {
            bail!("--threads must be at least 1");
        }
        if self.context == Some(0) {
            bail!("--context must be at least 1 token");
        }
        let manifest = Bundle::open_unverified(&dir)?.manifest;
        let context = self
            .context
            .or(board.as_ref().map(|b| b.context))
            .unwrap_or(manifest.context_length)
            .min(manifest.context_length);
        let estimate = MemoryEstimate::with_cache(&manifest, context, self.cache_format());
        if let Some(b) = &board
            && estimate.total() > b.budget_bytes()
        {
            // The longest context that would fit, if any.
            let per_token = MemoryEstimate::with_cache(&manifest, 1, self.cache_format())
                .kv_cache
                .max(1);
            let fixed = estimate.weights + estimate.working;
            let fits = b.budget_bytes().saturating_sub(fixed) / per_token;
            let int8 = MemoryEstimate::with_cache(&manifest, context, KvCacheFormat::Int8);
            let int8_works = !self.tract_kernels
                && KvCacheFormat::Int8
                    .check_head_dim(manifest.config.head_dim)
                    .is_ok();
            let advice = if self.kv_cache != KvCacheFormat::Int8
                && int8_works
                && int8.total() <= b.budget_bytes()
            {
                "run with --kv-cache int8 (a quarter of the KV cache's memory), or ".to_string()
            } else if fits >= 256 {
                format!("run with --context {fits} or less, or ")
            } else {
                String::new()
            };
            bail!(
                "{} needs about {estimate} but the {} board's memory budget is {} MB; \
                 {advice}use a smaller bundle: the board recommends preset `{}` ({}), \
                 e.g. `cargo xtask export --quant {}`",
                manifest.name,
                b.name,
                b.memory_budget_mb,
                b.bundle.preset,
                b.bundle.quant,
                b.bundle.quant,
            );
        }
        Ok(Resolved {
            dir,
            options: LoadOptions {
                threads,
                verify: true,
                quill_kernels: !self.tract_kernels,
                quill_attention: !self.tract_kernels,
                return_memory: true,
                context: Some(context),
                cache_dir: if self.no_cache {
                    None
                } else {
                    crate::cache::default_dir()
                },
                kv_cache: self.kv_cache,
                // Generation reads the last position's logits only; `eval` asks for all.
                all_logits: false,
            },
            board,
            estimate,
        })
    }

    fn load(&self) -> Result<Model> {
        let r = self.resolve()?;
        Ok(Model::load(&r.dir, &r.options)?)
    }
}

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// 0 = greedy (always the most likely token)
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all)
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Keep the most likely tokens up to this total probability (1 = all)
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one (0 = off)
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalty for tokens seen in the last --repeat-window tokens (1 = off)
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_window: usize,
    /// Random seed; the same seed and options give the same text [default: from the clock]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Most new tokens
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Stop before this text (repeatable)
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    fn options(&self) -> GenerateOptions {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        GenerateOptions {
            sampling: SamplingOptions {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                repeat_window: self.repeat_window,
                seed,
            },
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object (text and statistics) instead of streaming
    #[arg(long)]
    pub json: bool,
    /// The prompt; read from stdin when absent or "-"
    pub prompt: Option<String>,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// System message (replaces the template's default)
    #[arg(long)]
    pub system: Option<String>,
    /// Print one JSON object per reply instead of streaming
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print the manifest as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => generate(a),
        Command::Chat(a) => chat(a),
        Command::Info(a) => info(a),
        Command::Tokenize(a) => tokenize(a),
        Command::Bench(a) => bench(a),
        Command::Eval(a) => eval(a),
        Command::Serve(a) => serve(a),
        Command::Client(a) => client(a),
    }
}

fn read_prompt(arg: Option<String>) -> Result<String> {
    match arg.as_deref() {
        Some("-") | None => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("reading the prompt from stdin")?;
            String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "the prompt on stdin is not valid UTF-8 (invalid byte at offset {}); \
                     convert it to UTF-8 first",
                    e.utf8_error().valid_up_to()
                )
            })
        }
        Some(p) => Ok(p.to_string()),
    }
}

fn stats_json(s: &Stats, reason: StopReason, seed: u64) -> serde_json::Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "generated_tokens": s.generated_tokens,
        "time_to_first_token_ms": s.time_to_first_token.as_secs_f64() * 1e3,
        "prefill_tokens_per_s": s.prefill_tokens_per_s(),
        "decode_tokens_per_s": s.decode_tokens_per_s(),
        "stop_reason": reason.as_str(),
        "seed": seed,
    })
}

fn print_stats(s: &Stats, reason: StopReason, seed: u64) {
    eprintln!(
        "\n[prompt {} tokens, first token {:.0} ms, prefill {:.1} tok/s, decode {:.1} tok/s over {} tokens, stop: {}, seed {}]",
        s.prompt_tokens,
        s.time_to_first_token.as_secs_f64() * 1e3,
        s.prefill_tokens_per_s(),
        s.decode_tokens_per_s(),
        s.generated_tokens,
        reason.as_str(),
        seed
    );
}

fn generate(a: GenerateArgs) -> Result<()> {
    let prompt = read_prompt(a.prompt)?;
    let opts = a.sampling.options();
    let model = a.model.load()?;
    if !a.json {
        eprintln!(
            "[loaded {} in {:.2} s]",
            model.manifest().name,
            model.load_time.as_secs_f64()
        );
    }
    let mut session = model.session()?;
    let ids = model.tokenizer.encode(&prompt, false);
    let mut history = TokenBuf::new();
    let eos = model.manifest().eos_token_ids.clone();
    let mut gen_ = Generator::new(
        &mut session,
        &model.tokenizer,
        &eos,
        &mut history,
        &ids,
        &opts,
    )?;
    let (reason, stats, json) = stream(&mut gen_, a.json, opts.sampling.seed)?;
    drop(gen_);
    match json {
        Some(mut v) => {
            v["model"] = json!(model.manifest().name);
            // The generated ids (an end-of-sequence token included), for comparing runs.
            v["tokens"] = json!(history[ids.len()..]);
            v["load_ms"] = json!(model.load_time.as_secs_f64() * 1e3);
            println!("{v}");
        }
        None => print_stats(&stats, reason, opts.sampling.seed),
    }
    Ok(())
}

/// Runs a generation to its end: streams the text to stdout, or with `json` collects it into
/// the JSON object returned (not yet printed, so the caller can add fields).
fn stream<D: Decoder>(
    generator: &mut Generator<'_, D>,
    json: bool,
    seed: u64,
) -> Result<(StopReason, Stats, Option<serde_json::Value>)> {
    let mut text = String::new();
    let mut stdout = std::io::stdout().lock();
    let reason = generator.run(|t| {
        if json {
            text.push_str(t);
        } else {
            // A closed stdout (e.g. `| head`) is not an error worth a panic.
            let _ = stdout.write_all(t.as_bytes()).and_then(|_| stdout.flush());
        }
    })?;
    let stats = generator.stats().clone();
    if json {
        let mut v = stats_json(&stats, reason, seed);
        v["text"] = json!(text);
        return Ok((reason, stats, Some(v)));
    }
    writeln!(stdout)?;
    Ok((reason, stats, None))
}

fn chat(a: ChatArgs) -> Result<()> {
    let model = a.model.load()?;
    let Some(format) =
        ChatFormat::from_manifest(model.manifest(), &model.tokenizer, a.system.clone())
    else {
        bail!(
            "{} has no chat template quill can render (it renders ChatML); use `quill generate`",
            model.manifest().name
        );
    };
    let opts = a.sampling.options();
    let mut session = model.session()?;
    let mut history = TokenBuf::new();
    let eos = model.manifest().eos_token_ids.clone();
    eprintln!(
        "[{} loaded in {:.2} s; context {} tokens; type a message, /reset to start over, /quit or Ctrl-D to leave]",
        model.manifest().name,
        model.load_time.as_secs_f64(),
        session.context()
    );
    let stdin = std::io::stdin();
    let mut line = Vec::new();
    loop {
        if !a.json {
            eprint!("> ");
        }
        line.clear();
        if stdin.lock().read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let Ok(msg) = std::str::from_utf8(&line) else {
            eprintln!("[that line is not valid UTF-8; nothing was sent]");
            continue;
        };
        let msg = msg.trim_end_matches(['\n', '\r']);
        match msg.trim() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                session.reset()?;
                history.clear();
                eprintln!("[conversation cleared]");
                continue;
            }
            _ => {}
        }
        let input = format.user_turn(&model.tokenizer, &history, msg);
        let before = history.len();
        let mut gen_ = match Generator::new(
            &mut session,
            &model.tokenizer,
            &eos,
            &mut history,
            &input,
            &opts,
        ) {
            Ok(g) => g,
            Err(
                crate::GenerateError::ContextFull { context }
                | crate::GenerateError::PromptTooLong { context, .. },
            ) => {
                eprintln!(
                    "[the conversation is full: its {context}-token context cannot take this message; \
                     type /reset to start a new one]"
                );
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let (reason, _, json) = stream(&mut gen_, a.json, opts.sampling.seed)?;
        if let Some(v) = json {
            println!("{v}");
        }
        if reason == StopReason::ContextFull {
            eprintln!(
                "[the context is full ({} tokens); type /reset to start a new conversation]",
                session.context()
            );
        }
        debug_assert!(history.len() > before);
    }
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let dir = a.model.dir();
    let bundle = Bundle::open_unverified(&dir)?;
    let m = &bundle.manifest;
    if a.json {
        println!("{}", serde_json::to_string_pretty(m)?);
        return Ok(());
    }
    let c = &m.config;
    println!("bundle        {}", dir.display());
    println!("name          {}", m.name);
    println!("format        {} v{}", m.format, m.version);
    println!(
        "architecture  {} ({:.1} M parameters)",
        m.architecture,
        c.n_params as f64 / 1e6
    );
    println!("weights       {}", m.weights);
    if let Some(q) = &m.quantization {
        println!("quantization  {}", q.scheme);
        if !q.rotations.is_empty() {
            println!("rotations     {}", q.rotations.join(", "));
        }
        println!(
            "calibration   {}",
            q.calibration.as_deref().unwrap_or("none")
        );
        if !q.float_linears.is_empty() {
            println!("kept float32  {}", q.float_linears.join(", "));
        }
    }
    println!(
        "shape         {} layers, width {}, {} heads ({} key/value), head dim {}, FFN {}",
        c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff
    );
    println!(
        "vocabulary    {} tokens; end of sequence {:?}",
        c.vocab_size, m.eos_token_ids
    );
    println!(
        "context       {} tokens (RoPE theta {})",
        m.context_length, c.rope_theta
    );
    println!(
        "chat          {}",
        m.chat.as_ref().map(|c| c.format.as_str()).unwrap_or("none")
    );
    println!(
        "source        {} ({} bytes, sha256 {})",
        m.source.file, m.source.bytes, m.source.sha256
    );
    for f in &m.files {
        let status = match bundle.verify_file(f) {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("BAD: {e}"),
        };
        println!(
            "file          {} ({} bytes, crc32 {:08x}) {status}",
            f.name, f.bytes, f.crc32
        );
    }
    let board = a.model.board()?;
    let context = a
        .model
        .context
        .or(board.as_ref().map(|b| b.context))
        .unwrap_or(m.context_length)
        .min(m.context_length);
    let estimate = MemoryEstimate::with_cache(m, context, a.model.cache_format());
    println!("memory        about {estimate}");
    if let Some(b) = board {
        let threads = a.model.threads.unwrap_or(b.threads);
        println!(
            "board         {}: {} × {} ({}), {} threads, {} MB RAM, budget {} MB: {}",
            b.name,
            b.cores,
            b.cpu.model,
            b.cpu.features.join(", "),
            threads,
            b.ram_mb,
            b.memory_budget_mb,
            if estimate.total() <= b.budget_bytes() {
                "fits".to_owned()
            } else {
                format!(
                    "DOES NOT FIT; the board recommends preset `{}` ({})",
                    b.bundle.preset, b.bundle.quant
                )
            }
        );
        println!(
            "serial        {} at {} baud",
            b.serial.device, b.serial.baud
        );
    }
    Ok(())
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let text = read_prompt(a.text)?;
    let bundle = Bundle::open_unverified(&a.model.dir())?;
    let tok = crate::Tokenizer::from_file(&bundle.path(bundle::TOKENIZER_FILE))?;
    println!("{}", json!(tok.encode(&text, a.special)));
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    let resolved = a.model.resolve()?;
    let opts = crate::bench::BenchOptions {
        threads: resolved.options.threads,
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        runs: a.runs,
        profile: a.profile,
        quill_kernels: !a.model.tract_kernels,
        decode_at: a.decode_at.clone(),
        cache_dir: resolved.options.cache_dir.clone(),
        kv_cache: resolved.options.kv_cache,
    };
    let Some(other) = a.compare_threads else {
        let report = crate::bench::run(&resolved.dir, &opts)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{report}");
        }
        return Ok(());
    };
    anyhow::ensure!(other >= 1, "--compare-threads must be at least 1");
    let configs = [
        opts.clone(),
        crate::bench::BenchOptions {
            threads: other,
            ..opts
        },
    ];
    let reports = crate::bench::run_side_by_side(&resolved.dir, &configs)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            print!("{r}");
        }
        print!("{}", crate::bench::Comparison(&reports[0], &reports[1]));
    }
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let bytes = std::fs::read(&a.text).with_context(|| format!("reading {}", a.text.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid UTF-8 (invalid byte at offset {}); convert it to UTF-8 first",
            a.text.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    // Perplexity scores every position: both models compute all logits.
    let mut r = a.model.resolve()?;
    r.options.all_logits = true;
    let model = Model::load(&r.dir, &r.options)?;
    let other = match &a.against {
        Some(dir) => Some(Model::load(dir, &r.options)?),
        None => None,
    };
    let opts = crate::eval::EvalOptions {
        context: a.window,
        stride: a.stride,
        max_tokens: a.max_tokens,
        mode: if a.mode == "decode" {
            crate::eval::Mode::Decode
        } else {
            crate::eval::Mode::Prefill
        },
    };
    let r = crate::eval::evaluate(&model, other.as_ref(), &text, &opts)?;
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = json!(model.manifest().name);
        v["against"] = json!(other.as_ref().map(|m| m.manifest().name.clone()));
        v["text"] = json!(a.text.display().to_string());
        println!("{v}");
        return Ok(());
    }
    println!(
        "{}: perplexity {:.3} over {} of {} tokens ({} mode, context {}, stride {})",
        model.manifest().name,
        r.perplexity,
        r.scored_tokens,
        r.text_tokens,
        a.mode,
        r.context,
        r.stride
    );
    if let (Some(o), Some(p), Some(agree), Some(kl)) = (
        &other,
        r.other_perplexity,
        r.top1_agreement,
        r.kl_divergence,
    ) {
        println!(
            "{}: perplexity {p:.3}; top-1 agreement {:.2}%; KL({} ‖ {}) {kl:.5} nats/token",
            o.manifest().name,
            agree * 100.0,
            o.manifest().name,
            model.manifest().name,
        );
    }
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    use crate::serve::port::FdPort;
    use crate::serve::{Console, Mode, ModelBackend, led};

    // Open the line before the slow model load, so that a wrong device fails at once.
    let port = if let Some(dev) = &a.serial {
        FdPort::open_serial(dev, a.baud, a.rtscts)?
    } else if a.pty {
        FdPort::open_pty(Some(a.baud)).context("creating a pseudo-terminal")?
    } else {
        FdPort::stdio()?
    };
    // Switched off (and checked) before the server says it is ready.
    let led = match &a.status_led {
        Some(path) => Some(led::FileLed::open(path)?),
        None => None,
    };
    let model = a.model.load()?;
    let name = model.manifest().name.clone();
    let backend = ModelBackend::new(model, a.system.clone())?;
    let mode = match a.mode {
        ModeArg::Text => Mode::Text,
        ModeArg::Binary => Mode::Binary,
    };
    if !(a.write_timeout >= 0.0 && a.write_timeout.is_finite()) {
        bail!(
            "--write-timeout must be a number of seconds ≥ 0, got {}",
            a.write_timeout
        );
    }
    let timeout =
        (a.write_timeout > 0.0).then(|| std::time::Duration::from_secs_f64(a.write_timeout));
    let opts = a.sampling.options();
    // SIGTERM and SIGINT from here on end the serve loop cleanly (within a token) and exit 0;
    // during the load above they end the process the default way.
    crate::serve::stop::install().context("installing the SIGTERM handler")?;
    match &port.line {
        crate::serve::port::Line::Pty { slave } => {
            // The path alone on stdout, for scripts and tests; the rest on stderr.
            println!("{}", slave.display());
            std::io::stdout().flush()?;
        }
        crate::serve::port::Line::Serial { path, baud, .. } if !a.quiet => {
            eprintln!("quill serve: {name} on {} at {baud} baud", path.display());
        }
        _ => {}
    }
    if !a.quiet {
        eprintln!(
            "quill serve: {name} ready ({} mode){}",
            match mode {
                Mode::Text => "text",
                Mode::Binary => "binary",
            },
            if a.pty {
                "; open the path above with picocom or screen"
            } else {
                ""
            }
        );
    }
    match led {
        Some(led) => {
            let mut c = Console::new(backend, led, opts, a.sampling.seed, mode);
            c.verbose = !a.quiet;
            crate::serve::serve(&mut c, port, timeout)
        }
        None => {
            let mut c = Console::new(backend, led::NoLed, opts, a.sampling.seed, mode);
            c.verbose = !a.quiet;
            crate::serve::serve(&mut c, port, timeout)
        }
    }
}

fn client(a: ClientArgs) -> Result<()> {
    use crate::serve::port::FdPort;
    use quill_protocol::{Client, ClientError, Generate, Sampling, truncated};

    let mut port = FdPort::open_serial(&a.serial, a.baud, a.rtscts)?;
    if !(a.timeout > 0.0 && a.timeout.is_finite()) {
        bail!(
            "--timeout must be a positive number of seconds, got {}",
            a.timeout
        );
    }
    port.set_read_timeout(Some(std::time::Duration::from_secs_f64(a.timeout)));
    port.set_write_timeout(Some(std::time::Duration::from_secs_f64(a.timeout)));
    let mut client = Client::new(port);
    let why = |e: ClientError<crate::serve::port::PortError>| match e {
        ClientError::Io(e) => anyhow::anyhow!("the serial line failed: {e}"),
        ClientError::Closed => anyhow::anyhow!("the server closed the line"),
        ClientError::Frame(e) => anyhow::anyhow!("the server sent a {}", e.describe()),
        ClientError::Server(r) => anyhow::anyhow!("the server refused: {:?}: {}", r.code, r.detail),
        ClientError::Unexpected(r) => anyhow::anyhow!("unexpected answer from the server: {r:?}"),
    };
    if a.ping {
        let t0 = std::time::Instant::now();
        client.ping(0x5155_494c).map_err(why)?;
        println!("pong in {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
    }
    if a.info {
        let i = client.info().map_err(why)?;
        println!(
            "{} ({} weights), context {} tokens ({} in use), vocabulary {}, protocol {}, prompts up to {} bytes",
            i.model, i.weights, i.context, i.context_used, i.vocab, i.protocol, i.max_prompt
        );
    }
    if a.reset {
        client.send(&quill_protocol::Request::Reset).map_err(why)?;
        match client.recv().map_err(why)? {
            quill_protocol::Response::ResetDone => {}
            other => bail!("unexpected answer to Reset: {other:?}"),
        }
    }
    let Some(prompt) = a.prompt else {
        if a.ping || a.info || a.reset {
            return Ok(());
        }
        bail!("give a prompt, or --ping, --info or --reset");
    };
    if prompt.len() > quill_protocol::MAX_PROMPT {
        bail!(
            "the prompt is {} bytes; the protocol carries at most {} (quill_protocol::MAX_PROMPT)",
            prompt.len(),
            quill_protocol::MAX_PROMPT
        );
    }
    let req = Generate {
        id: 1,
        prompt: truncated(&prompt),
        chat: a.chat,
        sampling: Sampling {
            max_tokens: a.max_tokens,
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: None,
            repeat_penalty: None,
            seed: a.seed,
        },
    };
    let mut text = String::new();
    let mut stdout = std::io::stdout().lock();
    let done = client
        .generate(req, |t| {
            if a.json {
                text.push_str(t);
            } else {
                let _ = stdout.write_all(t.as_bytes()).and_then(|_| stdout.flush());
            }
            true
        })
        .map_err(why)?;
    if a.json {
        println!(
            "{}",
            json!({
                "text": text,
                "finish": format!("{:?}", done.finish),
                "prompt_tokens": done.prompt_tokens,
                "generated_tokens": done.generated_tokens,
                "prefill_ms": done.prefill_ms,
                "decode_ms": done.decode_ms,
                "context_used": done.context_used,
                "context": done.context,
            })
        );
    } else {
        writeln!(stdout)?;
        eprintln!(
            "[{:?}: {} prompt tokens in {} ms, {} tokens in {} ms; context {}/{}]",
            done.finish,
            done.prompt_tokens,
            done.prefill_ms,
            done.generated_tokens,
            done.decode_ms,
            done.context_used,
            done.context
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Command};

    /// clap's own consistency check over every subcommand.
    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// `eval`'s window and the model's `--context` once shared a name: clap's check above let
    /// it through, and every `quill eval` without `--context` failed to parse.
    #[test]
    fn eval_parses_with_and_without_its_options() {
        let Command::Eval(a) = Cli::try_parse_from(["quill", "eval", "--text", "t.txt"])
            .expect("eval with defaults")
            .command
        else {
            panic!("not eval");
        };
        assert_eq!((a.window, a.stride, a.model.context), (512, 256, None));
        let Command::Eval(a) = Cli::try_parse_from([
            "quill",
            "eval",
            "--text",
            "t.txt",
            "--window",
            "64",
            "--context",
            "100",
        ])
        .expect("eval with a window and a context")
        .command
        else {
            panic!("not eval");
        };
        assert_eq!((a.window, a.model.context), (64, Some(100)));
    }
}
