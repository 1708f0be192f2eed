//! Best-fit packing: samples go, longest first, into the row whose free space
//! they fill most tightly, so rows of `capacity` tokens waste few.

use std::collections::BTreeSet;

/// Groups sample indices into rows of at most `capacity` tokens. Every length
/// must be at most `capacity`. Deterministic: ties go to the earlier sample and
/// the earlier row.
pub fn best_fit(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // (free space, row): the tightest fit is the first entry at or above a length.
    let mut free: BTreeSet<(usize, usize)> = BTreeSet::new();
    for sample in order {
        let len = lengths[sample];
        assert!(len <= capacity, "sample longer than a row");
        let (row, left) = match free.range((len, 0)..).next().copied() {
            Some((space, row)) => {
                free.remove(&(space, row));
                rows[row].push(sample);
                (row, space - len)
            }
            None => {
                rows.push(vec![sample]);
                (rows.len() - 1, capacity - len)
            }
        };
        if left > 0 {
            free.insert((left, row));
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_tightly_and_keeps_every_sample_once() {
        let lengths = [7, 3, 5, 2, 8, 1, 4];
        let rows = best_fit(&lengths, 10);
        let mut seen: Vec<usize> = rows.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for row in &rows {
            assert!(row.iter().map(|&i| lengths[i]).sum::<usize>() <= 10);
        }
        assert_eq!(rows.len(), 3, "30 tokens fit in three rows of 10: {rows:?}");
        assert_eq!(best_fit(&lengths, 10), rows, "deterministic");
    }
}
