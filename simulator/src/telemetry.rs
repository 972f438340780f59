//! Telemetry payloads of one simulated device.
//!
//! Benchmarks should exercise Sluice with data that looks like a real sensor
//! fleet: values that drift slowly around a plausible level and never leave a
//! physical range, not uniform noise. Each metric is therefore a bounded,
//! mean-reverting random walk whose state is kept per device.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::fmt::Write as _;

#[cfg(test)]
use serde_json::{Map, Value};

/// How one metric moves from message to message.
#[derive(Debug, Clone, PartialEq)]
struct WalkSpec {
    /// Lowest value the metric may take.
    min: f64,
    /// Highest value the metric may take.
    max: f64,
    /// Level the walk drifts back towards.
    centre: f64,
    /// Half-width of the range a fresh device starts in, around `centre`.
    start_spread: f64,
    /// Largest random change per message.
    step: f64,
    /// Fraction of the distance to `centre` recovered per message.
    reversion: f64,
    /// Constant change per message (negative for a draining battery).
    trend: f64,
    /// Value to jump to when the walk reaches `min` under a negative trend
    /// (a battery being replaced); `None` to just stay clamped.
    reset_to: Option<f64>,
    /// Decimal places kept in the payload, like a sensor's resolution.
    decimals: i32,
}

/// The four named metrics, in the order `--metrics` takes them.
fn named_specs() -> [(&'static str, WalkSpec); 4] {
    [
        (
            "temperature",
            WalkSpec {
                min: -10.0,
                max: 50.0,
                centre: 21.0,
                start_spread: 3.0,
                step: 0.15,
                reversion: 0.002,
                trend: 0.0,
                reset_to: None,
                decimals: 2,
            },
        ),
        (
            "humidity",
            WalkSpec {
                min: 0.0,
                max: 100.0,
                centre: 45.0,
                start_spread: 10.0,
                step: 0.5,
                reversion: 0.002,
                trend: 0.0,
                reset_to: None,
                decimals: 1,
            },
        ),
        (
            "pressure",
            WalkSpec {
                min: 950.0,
                max: 1050.0,
                centre: 1013.25,
                start_spread: 8.0,
                step: 0.2,
                reversion: 0.001,
                trend: 0.0,
                reset_to: None,
                decimals: 2,
            },
        ),
        (
            "battery",
            WalkSpec {
                min: 0.0,
                max: 100.0,
                centre: 100.0,
                start_spread: 40.0,
                step: 0.02,
                reversion: 0.0,
                trend: -0.005,
                reset_to: Some(100.0),
                decimals: 2,
            },
        ),
    ]
}

/// Generic percentage-like gauge used for `m5`, `m6`, ….
/// A walk with no trend that drifts back towards `centre`.
const fn level(min: f64, max: f64, centre: f64, spread: f64, step: f64, decimals: i32) -> WalkSpec {
    WalkSpec {
        min,
        max,
        centre,
        start_spread: spread,
        step,
        reversion: 0.01,
        trend: 0.0,
        reset_to: None,
        decimals,
    }
}

/// `spec` without mean reversion: a position wanders, it does not return.
const fn wander(spec: WalkSpec) -> WalkSpec {
    WalkSpec {
        reversion: 0.0,
        ..spec
    }
}

/// What a simulated device is: which fields its payloads carry and how
/// they move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Temperature, humidity, pressure, battery (then `m5`, `m6`, … up to
    /// `--metrics`), drifting slowly.
    EnvSensor,
    /// GPS position, speed, heading and battery, and now and then a
    /// non-numeric `status`.
    AssetTracker,
    /// A three-phase power meter: 12 metrics, among them a kWh counter that
    /// only grows.
    Meter,
    /// An environmental sensor that also sends bad JSON, payloads over the
    /// broker's size limit and messages to a topic it may not use, and now
    /// and then has a reconnect storm (see `misbehaviour.rs`).
    Misbehaving,
}

/// How often an asset tracker adds its `status` field (every Nth message).
const STATUS_EVERY: u64 = 20;
const STATUSES: [&str; 3] = ["moving", "parked", "charging"];

fn tracker_specs() -> Vec<(&'static str, WalkSpec)> {
    vec![
        // Anywhere between the polar circles, then ~50 m per message, with
        // no pull back towards the equator.
        ("lat", wander(level(-66.0, 66.0, 0.0, 60.0, 0.0005, 6))),
        ("lon", wander(level(-180.0, 180.0, 0.0, 175.0, 0.0005, 6))),
        ("speed", level(0.0, 130.0, 40.0, 30.0, 3.0, 1)),
        ("heading", level(0.0, 359.0, 180.0, 179.0, 8.0, 0)),
        ("battery", named_specs()[3].1.clone()),
    ]
}

fn meter_specs() -> Vec<(&'static str, WalkSpec)> {
    let volts = level(207.0, 253.0, 230.0, 3.0, 0.3, 1);
    let amps = level(0.0, 63.0, 16.0, 10.0, 0.5, 2);
    vec![
        ("voltage_l1", volts.clone()),
        ("voltage_l2", volts.clone()),
        ("voltage_l3", volts),
        ("current_l1", amps.clone()),
        ("current_l2", amps.clone()),
        ("current_l3", amps),
        ("power_kw", level(0.0, 43.0, 11.0, 6.0, 0.3, 3)),
        ("power_factor", level(0.7, 1.0, 0.95, 0.03, 0.005, 3)),
        ("frequency_hz", level(49.8, 50.2, 50.0, 0.02, 0.005, 3)),
        ("thd_pct", level(0.0, 20.0, 3.0, 1.0, 0.1, 2)),
        ("temperature", named_specs()[0].1.clone()),
        (
            "energy_kwh",
            // A counter: it only moves up, by a little each message.
            WalkSpec {
                min: 0.0,
                max: 1e12,
                centre: 0.0,
                start_spread: 0.0,
                step: 0.0,
                reversion: 0.0,
                trend: 0.003,
                reset_to: None,
                decimals: 3,
            },
        ),
    ]
}

fn generic_spec() -> WalkSpec {
    WalkSpec {
        min: 0.0,
        max: 100.0,
        centre: 50.0,
        start_spread: 20.0,
        step: 1.0,
        reversion: 0.005,
        trend: 0.0,
        reset_to: None,
        decimals: 2,
    }
}

/// One metric's walk state.
#[derive(Debug, Clone)]
struct Walk {
    name: String,
    spec: WalkSpec,
    value: f64,
}

impl Walk {
    fn new(name: String, spec: WalkSpec, rng: &mut impl Rng) -> Self {
        let lo = (spec.centre - spec.start_spread).max(spec.min);
        let hi = (spec.centre + spec.start_spread).min(spec.max);
        let value = rng.random_range(lo..=hi);
        Walk { name, spec, value }
    }

    fn advance(&mut self, rng: &mut impl Rng) {
        let s = &self.spec;
        let noise = rng.random_range(-s.step..=s.step);
        let next = self.value + noise + s.trend + s.reversion * (s.centre - self.value);
        self.value = match s.reset_to {
            Some(reset) if next <= s.min => reset,
            _ => next.clamp(s.min, s.max),
        };
    }

    /// The value as reported: rounded to the sensor resolution.
    fn reading(&self) -> f64 {
        let scale = 10f64.powi(self.spec.decimals);
        (self.value * scale).round() / scale
    }

    /// Appends `,"name":value` to a JSON object being written. The walk is
    /// clamped, so the value is always finite; Rust prints the shortest
    /// decimal that reads back as the same f64, never in exponent form, and
    /// a whole number gets a `.0` so every reading reads as a float.
    fn write_field(&self, out: &mut String) {
        let v = self.reading();
        // Writing to a String cannot fail.
        let _ = if v.fract() == 0.0 {
            write!(out, ",\"{}\":{v:.1}", self.name)
        } else {
            write!(out, ",\"{}\":{v}", self.name)
        };
    }
}

/// Produces the successive telemetry messages of one device.
#[derive(Debug)]
pub struct TelemetryGenerator {
    seq: u64,
    /// The last `ts` stamped, so the next one can be later.
    last_ts_ms: Option<i64>,
    walks: Vec<Walk>,
    /// Adds a non-numeric `status` every [`STATUS_EVERY`] messages.
    status: bool,
    rng: SmallRng,
}

impl TelemetryGenerator {
    /// A generator with `metrics` numeric fields besides `seq`. A fixed
    /// `seed` makes the value sequence reproducible.
    pub fn new(metrics: usize, seed: Option<u64>) -> Self {
        let mut rng = match seed {
            Some(seed) => SmallRng::seed_from_u64(seed),
            None => SmallRng::from_os_rng(),
        };
        let named = named_specs();
        let walks = (0..metrics)
            .map(|i| match named.get(i) {
                Some((name, spec)) => Walk::new((*name).to_owned(), spec.clone(), &mut rng),
                None => Walk::new(format!("m{}", i + 1), generic_spec(), &mut rng),
            })
            .collect();
        TelemetryGenerator {
            seq: 0,
            last_ts_ms: None,
            walks,
            status: false,
            rng,
        }
    }

    /// A device of `profile`; `metrics` counts the environmental sensor's
    /// fields (the other profiles have fixed ones).
    pub fn for_profile(profile: Profile, metrics: usize, seed: Option<u64>) -> Self {
        let specs = match profile {
            Profile::EnvSensor | Profile::Misbehaving => return Self::new(metrics, seed),
            Profile::AssetTracker => tracker_specs(),
            Profile::Meter => meter_specs(),
        };
        let mut g = Self::new(0, seed);
        g.walks = specs
            .into_iter()
            .map(|(name, spec)| Walk::new(name.to_owned(), spec, &mut g.rng))
            .collect();
        g.status = profile == Profile::AssetTracker;
        g
    }

    /// Numeric fields per message: the points each message stores, `seq`
    /// not counted.
    pub fn numeric_fields(&self) -> usize {
        self.walks.len()
    }

    /// `seq` of the next message.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// `ts` of the last message made, if any.
    pub fn last_ts_ms(&self) -> Option<i64> {
        self.last_ts_ms
    }

    /// The next message serialised as the MQTT payload, a JSON object
    /// `{"seq":…,"ts":…,"<metric>":…,…}` stamped with `now_ms` (epoch
    /// milliseconds), or 1 ms after the previous message when that is later.
    /// Advances `seq` by one and every walk by one step.
    ///
    /// Every message of a device gets its own time, as every sample of a
    /// real sensor does. Unthrottled, a device publishes many messages within
    /// one millisecond of the clock; stamped alike they would be repeated
    /// (series, time) keys, which PostgreSQL's btree stores deduplicated and
    /// far more cheaply than real data, flattering every storage benchmark.
    ///
    /// Written directly rather than through a `serde_json::Map`: at tens of
    /// thousands of messages per second the map's allocations were a
    /// noticeable share of the load generator's CPU, which it takes from the
    /// Sluice and PostgreSQL it shares the machine with in benchmarks.
    pub fn next_payload(&mut self, now_ms: i64) -> Vec<u8> {
        let ts_ms = self
            .last_ts_ms
            .map_or(now_ms, |last| now_ms.max(last.saturating_add(1)));
        self.last_ts_ms = Some(ts_ms);
        let mut out = String::with_capacity(32 + 24 * self.walks.len());
        let _ = write!(out, "{{\"seq\":{},\"ts\":{ts_ms}", self.seq);
        for walk in &self.walks {
            walk.write_field(&mut out);
        }
        if self.status && self.seq % STATUS_EVERY == STATUS_EVERY - 1 {
            let status = STATUSES[self.rng.random_range(0..STATUSES.len())];
            let _ = write!(out, ",\"status\":\"{status}\"");
        }
        out.push('}');
        self.seq += 1;
        for walk in &mut self.walks {
            walk.advance(&mut self.rng);
        }
        out.into_bytes()
    }

    /// The next message, parsed back (tests read fields by name).
    #[cfg(test)]
    pub fn next_message(&mut self, now_ms: i64) -> Map<String, Value> {
        match serde_json::from_slice(&self.next_payload(now_ms)) {
            Ok(Value::Object(map)) => map,
            other => panic!("the payload is not a JSON object: {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_a_json_object_with_the_expected_fields() {
        let mut g = TelemetryGenerator::new(4, Some(1));
        let v: Value = serde_json::from_slice(&g.next_payload(1_700_000_000_123)).unwrap();
        let obj = v.as_object().expect("payload is a JSON object");
        let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "battery",
                "humidity",
                "pressure",
                "seq",
                "temperature",
                "ts"
            ]
        );
        assert_eq!(obj["seq"], 0);
        assert_eq!(obj["ts"], 1_700_000_000_123_i64);
        for key in ["temperature", "humidity", "pressure", "battery"] {
            assert!(obj[key].is_f64(), "{key} should be a number: {}", obj[key]);
        }
    }

    #[test]
    fn each_message_of_a_device_has_its_own_time() {
        let mut g = TelemetryGenerator::new(1, Some(3));
        let ts = |g: &mut TelemetryGenerator, now| g.next_message(now)["ts"].as_i64().unwrap();
        // Three messages within one millisecond of the clock, then the clock
        // catches up, then jumps ahead.
        assert_eq!(g.last_ts_ms(), None);
        assert_eq!(ts(&mut g, 1_000), 1_000);
        assert_eq!(g.last_ts_ms(), Some(1_000));
        assert_eq!(ts(&mut g, 1_000), 1_001);
        assert_eq!(ts(&mut g, 1_000), 1_002);
        assert_eq!(ts(&mut g, 1_002), 1_003);
        assert_eq!(ts(&mut g, 5_000), 5_000);
    }

    #[test]
    fn metrics_count_controls_fields() {
        let fields = |k| {
            let mut g = TelemetryGenerator::new(k, Some(2));
            let obj = g.next_message(0);
            obj.keys().cloned().collect::<Vec<_>>()
        };
        assert_eq!(fields(0), ["seq", "ts"]);
        assert_eq!(fields(2).len(), 4);
        assert!(fields(2).contains(&"humidity".to_owned()));
        assert!(!fields(2).contains(&"pressure".to_owned()));
        let six = fields(6);
        assert_eq!(six.len(), 8);
        assert!(six.contains(&"m5".to_owned()));
        assert!(six.contains(&"m6".to_owned()));
        assert!(!six.contains(&"m7".to_owned()));
    }

    #[test]
    fn seq_starts_at_zero_and_increments_by_one() {
        let mut g = TelemetryGenerator::new(4, None);
        for expected in 0..100u64 {
            assert_eq!(g.next_seq(), expected);
            let v: Value = serde_json::from_slice(&g.next_payload(0)).unwrap();
            assert_eq!(v["seq"].as_u64(), Some(expected));
        }
    }

    #[test]
    fn values_stay_plausible_over_many_steps() {
        let bounds = [
            ("temperature", -10.0, 50.0),
            ("humidity", 0.0, 100.0),
            ("pressure", 950.0, 1050.0),
            ("battery", 0.0, 100.0),
            ("m5", 0.0, 100.0),
            ("m6", 0.0, 100.0),
        ];
        for seed in 0..5 {
            let mut g = TelemetryGenerator::new(6, Some(seed));
            for _ in 0..10_000 {
                let obj = g.next_message(0);
                for (key, lo, hi) in bounds {
                    let x = obj[key].as_f64().unwrap();
                    assert!(x.is_finite() && (lo..=hi).contains(&x), "{key} = {x}");
                }
            }
        }
    }

    #[test]
    fn values_drift_smoothly_and_temperature_stays_near_room_level() {
        let mut g = TelemetryGenerator::new(4, Some(42));
        let mut prev = g.next_message(0)["temperature"].as_f64().unwrap();
        let mut sum = prev;
        for _ in 1..10_000 {
            let t = g.next_message(0)["temperature"].as_f64().unwrap();
            // One step plus rounding: a sensor does not jump.
            assert!((t - prev).abs() < 0.25, "jump from {prev} to {t}");
            prev = t;
            sum += t;
        }
        let mean = sum / 10_000.0;
        assert!((10.0..=32.0).contains(&mean), "mean temperature {mean}");
    }

    #[test]
    fn same_seed_gives_same_values_and_devices_differ() {
        let mut a = TelemetryGenerator::new(4, Some(7));
        let mut b = TelemetryGenerator::new(4, Some(7));
        let mut c = TelemetryGenerator::new(4, Some(8));
        let (pa, pb, pc) = (a.next_payload(5), b.next_payload(5), c.next_payload(5));
        assert_eq!(pa, pb);
        assert_ne!(pa, pc);
    }

    #[test]
    fn profiles_carry_their_own_fields_within_range() {
        let mut tracker = TelemetryGenerator::for_profile(Profile::AssetTracker, 4, Some(1));
        let mut statuses = 0;
        let (mut lat0, mut lat_last) = (None, 0.0);
        for _ in 0..200 {
            let m = tracker.next_message(0);
            for key in ["lat", "lon", "speed", "heading", "battery", "seq", "ts"] {
                assert!(m[key].is_number(), "{key} in {m:?}");
            }
            let lat = m["lat"].as_f64().unwrap();
            assert!((-66.0..=66.0).contains(&lat));
            lat0.get_or_insert(lat);
            lat_last = lat;
            if let Some(s) = m.get("status") {
                assert!(STATUSES.contains(&s.as_str().unwrap()));
                statuses += 1;
            }
        }
        assert_eq!(statuses, 200 / STATUS_EVERY as usize);
        // 200 steps of at most 0.0005 degrees: a vehicle, not a teleporter.
        assert!((lat_last - lat0.unwrap()).abs() <= 0.1);
        assert_eq!(tracker.numeric_fields(), 5);

        let mut meter = TelemetryGenerator::for_profile(Profile::Meter, 4, Some(2));
        assert_eq!(meter.numeric_fields(), 12);
        let mut energy = -1.0;
        for _ in 0..500 {
            let m = meter.next_message(0);
            let e = m["energy_kwh"].as_f64().unwrap();
            assert!(e >= energy, "the energy counter went back: {energy} -> {e}");
            energy = e;
            let v = m["voltage_l2"].as_f64().unwrap();
            assert!((207.0..=253.0).contains(&v));
            assert_eq!(m.len(), 14, "12 metrics, seq and ts");
        }
        assert!(energy > 1.0);
    }

    #[test]
    fn battery_drains_and_is_replaced_when_empty() {
        let spec = named_specs()[3].1.clone();
        let mut rng = SmallRng::seed_from_u64(3);
        let mut walk = Walk {
            name: "battery".to_owned(),
            spec,
            value: 0.01,
        };
        walk.advance(&mut rng);
        assert_eq!(walk.value, 100.0);
        let mut w = Walk {
            value: 80.0,
            ..walk
        };
        for _ in 0..1000 {
            w.advance(&mut rng);
        }
        assert!(w.value < 80.0, "battery should drain, is {}", w.value);
    }

    #[test]
    fn readings_are_written_as_floats_at_the_sensor_resolution() {
        let spec = named_specs()[3].1.clone();
        let field = |value: f64| {
            let walk = Walk {
                name: "battery".to_owned(),
                spec: spec.clone(),
                value,
            };
            let mut out = String::new();
            walk.write_field(&mut out);
            out
        };
        assert_eq!(field(100.0), r#","battery":100.0"#);
        assert_eq!(field(12.345_678), r#","battery":12.35"#);
        assert_eq!(field(-0.5), r#","battery":-0.5"#);
        assert_eq!(field(0.1 + 0.2), r#","battery":0.3"#);
    }
}
