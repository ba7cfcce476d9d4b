//! Where a forward's time goes, for tuning. With `HIP_PROFILE_FORWARD=1`,
//! [`crate::model::Model::forward`] waits for the device after each phase of every layer and
//! adds the phase's wall time to a process-wide tally, printed to stderr (the mean per forward)
//! every 32 forwards; the waits themselves cost time, so only the shares are meaningful. With
//! `HIP_PROFILE_FORWARD=2` it waits only at the end and tallies how long the host took to issue
//! the forward's work against how long until the device finished it (equal: the host is the
//! bottleneck). Off by default (one cached environment read per forward).

use std::sync::Mutex;
use std::time::Instant;

use candle_core::Device;

use crate::error::Result;

/// The phases of a forward.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Phase {
    /// Token ids, embeddings, RoPE tables, the step's KV rows.
    Setup = 0,
    /// Attention norm and the Q, K, V projections.
    Qkv,
    /// RoPE and the dtype conversion for the cache.
    Rope,
    /// Writing K and V into the cache.
    KvWrite,
    /// Attention.
    Attention,
    /// The output projection and residual.
    OutProj,
    /// FFN norm and the MLP.
    Mlp,
    /// Final norm and the LM head.
    Head,
}

const NAMES: [&str; 8] = ["setup", "qkv", "rope", "kv write", "attention", "o proj", "mlp", "head"];

static TALLY: Mutex<([f64; 8], usize)> = Mutex::new(([0.0; 8], 0));

/// The phase timer of one forward (inert unless `HIP_PROFILE_FORWARD` is 1 or 2).
pub(crate) struct Phases {
    dev: Option<Device>,
    /// Per phase (mode 1) or only at the end (mode 2).
    phases: bool,
    t0: Instant,
    t: Instant,
    acc: [f64; 8],
}

impl Phases {
    pub(crate) fn start(dev: &Device) -> Result<Self> {
        static MODE: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
        let mode = *MODE.get_or_init(|| match std::env::var("HIP_PROFILE_FORWARD").as_deref() {
            Ok("1") => 1,
            Ok("2") => 2,
            _ => 0,
        });
        let dev = (mode > 0).then(|| dev.clone());
        if let Some(d) = &dev {
            d.synchronize()?;
        }
        let now = Instant::now();
        Ok(Phases { dev, phases: mode == 1, t0: now, t: now, acc: [0.0; 8] })
    }

    /// Ends phase `p` (waits for the device when profiling phases).
    pub(crate) fn mark(&mut self, p: Phase) -> Result<()> {
        if let (Some(d), true) = (&self.dev, self.phases) {
            d.synchronize()?;
            let now = Instant::now();
            self.acc[p as usize] += (now - self.t).as_secs_f64();
            self.t = now;
        }
        Ok(())
    }

    /// Adds this forward to the tally; prints the means every 32 forwards.
    pub(crate) fn finish(mut self) -> Result<()> {
        let Some(d) = &self.dev else { return Ok(()) };
        if !self.phases {
            self.acc[0] = self.t0.elapsed().as_secs_f64();
            d.synchronize()?;
            self.acc[1] = self.t0.elapsed().as_secs_f64();
        }
        let mut g = TALLY.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (a, x) in g.0.iter_mut().zip(self.acc) {
            *a += x;
        }
        g.1 += 1;
        if g.1 % 32 == 0 {
            let n = g.1 as f64;
            let ms = |t: f64| t / n * 1e3;
            if self.phases {
                let total: f64 = ms(g.0.iter().sum::<f64>());
                let parts: Vec<String> =
                    NAMES.iter().zip(g.0).map(|(name, t)| format!("{name} {:.2}", ms(t))).collect();
                eprintln!(
                    "forward profile ({} forwards, ms each): total {total:.2} = {}",
                    g.1,
                    parts.join(", ")
                );
            } else {
                eprintln!(
                    "forward profile ({} forwards, ms each): host issued in {:.2}, device done at {:.2}",
                    g.1,
                    ms(g.0[0]),
                    ms(g.0[1])
                );
            }
            *g = ([0.0; 8], 0);
        }
        Ok(())
    }
}
