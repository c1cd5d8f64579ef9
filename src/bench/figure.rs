//! One measured figure beside one baseline: the unit of `ferry bench`'s table, plot and JSON.

/// Whether a larger value of a figure is better (throughput) or worse (time, bytes, latency).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One figure and its baseline. `ratio` is oriented so that above 1 means Ferry is better.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Issue 7 scenario number (set by the runner).
    pub scenario: usize,
    pub name: String,
    /// `None`: not measured (see `note`).
    pub value: Option<f64>,
    pub unit: String,
    pub better: Better,
    pub baseline: Option<String>,
    pub baseline_value: Option<f64>,
    /// What the issue asks for, in words ("≥ 1.0x qemu-img").
    pub aim: Option<String>,
    /// The ratio the aim asks for (`ratio >= aim_ratio` meets it).
    pub aim_ratio: Option<f64>,
    /// Why something is missing, or what to know when reading the figure.
    pub note: Option<String>,
}

impl Figure {
    /// A figure with no baseline yet.
    pub fn new(name: impl Into<String>, value: f64, unit: &str, better: Better) -> Figure {
        Figure {
            scenario: 0,
            name: name.into(),
            value: Some(value),
            unit: unit.to_owned(),
            better,
            baseline: None,
            baseline_value: None,
            aim: None,
            aim_ratio: None,
            note: None,
        }
    }

    /// A scenario that could not run: the figure says why.
    pub fn failed(name: &str, why: &str) -> Figure {
        Figure {
            scenario: 0,
            name: name.to_owned(),
            value: None,
            unit: String::new(),
            better: Better::Higher,
            baseline: None,
            baseline_value: None,
            aim: None,
            aim_ratio: None,
            note: Some(why.to_owned()),
        }
    }

    /// Sets the baseline (`None` value: the baseline could not run; `why` then says why).
    pub fn against(mut self, baseline: impl Into<String>, value: Option<f64>) -> Figure {
        self.baseline = Some(baseline.into());
        self.baseline_value = value;
        self
    }

    /// Sets the aim, as words and as the ratio that meets it.
    pub fn aim(mut self, words: &str, ratio: f64) -> Figure {
        self.aim = Some(words.to_owned());
        self.aim_ratio = Some(ratio);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Figure {
        let note = note.into();
        self.note = Some(match self.note.take() {
            Some(previous) => format!("{previous}; {note}"),
            None => note,
        });
        self
    }

    /// Ferry's figure over the baseline's, oriented so that above 1 means Ferry is better.
    pub fn ratio(&self) -> Option<f64> {
        let value = self.value?;
        let baseline = self.baseline_value?;
        let ratio = match self.better {
            Better::Higher => value / baseline,
            Better::Lower => baseline / value,
        };
        ratio.is_finite().then_some(ratio)
    }

    /// `Some(true)` when the aim is met, `Some(false)` when not, `None` without aim or ratio.
    pub fn aim_met(&self) -> Option<bool> {
        Some(self.ratio()? >= self.aim_ratio?)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "scenario": self.scenario,
            "name": self.name,
            "value": self.value.and_then(finite),
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_value": self.baseline_value.and_then(finite),
            "ratio": self.ratio(),
            "aim": self.aim,
            "aim_met": self.aim_met(),
            "note": self.note,
        })
    }
}

fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}

/// The `q`-quantile (0..=1) of `values` (nearest rank), `None` when empty.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_is_oriented_so_that_above_one_means_ferry_is_better() {
        let throughput = Figure::new("t", 2.0, "GB/s", Better::Higher).against("b", Some(1.0));
        assert_eq!(throughput.ratio(), Some(2.0));
        let time = Figure::new("t", 2.0, "s", Better::Lower).against("b", Some(1.0));
        assert_eq!(time.ratio(), Some(0.5));
        let missing = Figure::new("t", 2.0, "s", Better::Lower).against("b", None);
        assert_eq!(missing.ratio(), None);
        let zero = Figure::new("t", 0.0, "s", Better::Lower).against("b", Some(1.0));
        assert_eq!(zero.ratio(), None);
    }

    #[test]
    fn aim_is_met_at_or_above_its_ratio() {
        let figure = Figure::new("t", 1.0, "GB/s", Better::Higher)
            .against("b", Some(1.0))
            .aim("≥ 1.0x", 1.0);
        assert_eq!(figure.aim_met(), Some(true));
        let figure = figure.against("b", Some(2.0));
        assert_eq!(figure.aim_met(), Some(false));
    }

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.5), Some(50.0));
        assert_eq!(quantile(&values, 0.99), Some(99.0));
        assert_eq!(quantile(&values, 1.0), Some(100.0));
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), Some(2.0));
    }
}
