//! The training progress display: an `indicatif` bar (steps, loss, tokens/s, ETA) on a terminal;
//! on anything else (CI logs, a pipe) one plain line every few percent instead.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Bar {
    bar: Option<ProgressBar>,
    total: u64,
    tokens_per_step: usize,
    start: std::time::Instant,
    start_step: u64,
}

impl Bar {
    pub fn new(total: u64, done: u64, tokens_per_step: usize) -> Bar {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total).with_position(done);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} steps  {msg}  {elapsed_precise} (ETA {eta})",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            b.set_prefix("healing");
            b.reset_eta();
            b
        });
        Bar {
            bar,
            total,
            tokens_per_step,
            start: std::time::Instant::now(),
            start_step: done,
        }
    }

    /// After a step: loss, cross-entropy and this step's tokens/s.
    pub fn step(&self, step: u64, loss: f64, ce: f64, tokens_per_s: f64) {
        let msg = format!("loss {loss:.3} (CE {ce:.3})  {tokens_per_s:.0} tok/s");
        match &self.bar {
            Some(b) => {
                b.set_position(step);
                b.set_message(msg);
            }
            None => {
                let every = (self.total / 20).max(1);
                if step.is_multiple_of(every) || step == self.total || step == self.start_step + 1 {
                    let done = (step - self.start_step) as f64;
                    let per = self.start.elapsed().as_secs_f64() / done.max(1.0);
                    let eta = per * (self.total - step) as f64;
                    eprintln!(
                        "healing: step {step}/{} ({} tokens)  {msg}  ETA {eta:.0} s",
                        self.total,
                        step as usize * self.tokens_per_step
                    );
                }
            }
        }
    }

    /// A line above the bar.
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self, line: &str) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        eprintln!("{line}");
    }
}
