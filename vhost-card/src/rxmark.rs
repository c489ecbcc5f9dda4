//! How each frame handed to the host went up: DATA_VALID (the card verified or computed its
//! checksums, or its kernel vouched for them), NEEDS_CSUM (a partial checksum left to the host),
//! or unmarked, with the reason. Every frame the RX path hands up is counted once by its mark, so
//! `rx_data_valid + rx_needs_csum + Σ rx_unmarked_* = rx_frames`.

use std::sync::atomic::AtomicU64;

use crate::csum::Unchecked;
use crate::stats::PairStats;
use crate::vnet::{F_DATA_VALID, F_NEEDS_CSUM};

/// Why a frame went up with neither DATA_VALID nor NEEDS_CSUM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmarked {
    Fragment,
    NotIp,
    NoL4Csum,
    Malformed,
    BadCsum,
    Passthrough,
    NoGuestCsum,
}

impl From<Unchecked> for Unmarked {
    fn from(u: Unchecked) -> Self {
        match u {
            Unchecked::Fragment => Unmarked::Fragment,
            Unchecked::NotIp => Unmarked::NotIp,
            Unchecked::NoL4Csum => Unmarked::NoL4Csum,
            Unchecked::Malformed => Unmarked::Malformed,
        }
    }
}

/// A frame's mark as the host receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    DataValid,
    NeedsCsum,
    Unmarked(Unmarked),
}

impl Mark {
    /// The mark of a frame going up with header `flags`; `why` is the reason when it is unmarked.
    pub fn of(flags: u8, why: Unmarked) -> Mark {
        if flags & F_DATA_VALID != 0 {
            Mark::DataValid
        } else if flags & F_NEEDS_CSUM != 0 {
            Mark::NeedsCsum
        } else {
            Mark::Unmarked(why)
        }
    }

    /// The counter this mark adds to.
    pub fn counter(self, s: &PairStats) -> &AtomicU64 {
        match self {
            Mark::DataValid => &s.rx_data_valid,
            Mark::NeedsCsum => &s.rx_needs_csum,
            Mark::Unmarked(u) => match u {
                Unmarked::Fragment => &s.rx_unmarked_fragment,
                Unmarked::NotIp => &s.rx_unmarked_not_ip,
                Unmarked::NoL4Csum => &s.rx_unmarked_no_l4_csum,
                Unmarked::Malformed => &s.rx_unmarked_malformed,
                Unmarked::BadCsum => &s.rx_unmarked_bad_csum,
                Unmarked::Passthrough => &s.rx_unmarked_passthrough,
                Unmarked::NoGuestCsum => &s.rx_unmarked_no_guest_csum,
            },
        }
    }
}

/// The names of the counters that add up to `rx_frames`.
pub fn accounting_counters() -> impl Iterator<Item = &'static str> {
    crate::stats::COUNTERS
        .iter()
        .map(|c| c.name)
        .filter(|n| *n == "rx_data_valid" || *n == "rx_needs_csum" || n.starts_with("rx_unmarked_"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::add;

    #[test]
    fn flags_decide_and_every_mark_has_its_own_counter() {
        assert_eq!(Mark::of(F_DATA_VALID, Unmarked::BadCsum), Mark::DataValid);
        assert_eq!(Mark::of(F_NEEDS_CSUM, Unmarked::BadCsum), Mark::NeedsCsum);
        assert_eq!(
            Mark::of(0, Unmarked::Fragment),
            Mark::Unmarked(Unmarked::Fragment)
        );
        let s = PairStats::default();
        let marks = [
            Mark::DataValid,
            Mark::NeedsCsum,
            Mark::Unmarked(Unmarked::Fragment),
            Mark::Unmarked(Unmarked::NotIp),
            Mark::Unmarked(Unmarked::NoL4Csum),
            Mark::Unmarked(Unmarked::Malformed),
            Mark::Unmarked(Unmarked::BadCsum),
            Mark::Unmarked(Unmarked::Passthrough),
            Mark::Unmarked(Unmarked::NoGuestCsum),
        ];
        for (i, m) in marks.iter().enumerate() {
            add(m.counter(&s), 1 << i);
        }
        let snap = s.snapshot();
        let total: u64 = accounting_counters()
            .map(|n| snap.iter().find(|(k, _)| *k == n).unwrap().1)
            .sum();
        assert_eq!(total, (1 << marks.len()) - 1, "each mark counted once");
        assert_eq!(accounting_counters().count(), marks.len());
    }
}
