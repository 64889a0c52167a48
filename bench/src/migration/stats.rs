//! Medians and spreads of a sweep's figures.

/// The median and the range of some runs' values of one figure.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// How many values (runs that reported the figure).
    pub count: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` for no values; NaNs are not values (a run that did not report the figure).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut values: Vec<f64> = values.into_iter().filter(|v| !v.is_nan()).collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Spread {
            count: n,
            median,
            min: values[0],
            max: values[n - 1],
        })
    }

    /// `median (min–max)` with `decimals`, or the median alone for one value.
    pub fn show(&self, decimals: usize) -> String {
        if self.count == 1 {
            return format!("{:.decimals$}", self.median);
        }
        format!(
            "{:.decimals$} ({:.decimals$}–{:.decimals$})",
            self.median, self.min, self.max
        )
    }
}

/// [`Spread::show`], or "–" when no run reported the figure.
pub fn show(spread: Option<Spread>, decimals: usize) -> String {
    spread.map_or_else(|| "–".into(), |s| s.show(decimals))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts_and_the_range() {
        let s = Spread::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.count, s.median, s.min, s.max), (3, 2.0, 1.0, 3.0));
        let s = Spread::of([4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 10.0));
        assert_eq!(s.show(1), "3.0 (1.0–10.0)");
    }

    #[test]
    fn missing_values_are_left_out_and_none_is_no_spread() {
        let s = Spread::of([f64::NAN, 5.0]).unwrap();
        assert_eq!((s.count, s.median), (1, 5.0));
        assert_eq!(s.show(0), "5");
        assert_eq!(Spread::of([f64::NAN]), None);
        assert_eq!(Spread::of(Vec::new()), None);
        assert_eq!(show(None, 1), "–");
    }
}
