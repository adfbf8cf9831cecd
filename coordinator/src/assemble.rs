//! Pure helpers of the scheduling path: splitting a plan's windows over workers, halo partners,
//! and reading f32 bytes. (Fusing windows is the workers' job: `longtake_model::window::fuse`,
//! the one implementation that halos and the final latents both use.)

use std::ops::Range;

use crate::plan::Window;

/// Split `n` windows into contiguous groups over workers in proportion to their capacities
/// (0 counts as 1), in worker order: the largest-remainder method, ties to the earlier worker.
/// Returns one range per worker; workers beyond `n` windows get empty ranges.
pub fn split_windows(n: usize, capacities: &[u32]) -> Vec<Range<usize>> {
    if capacities.is_empty() {
        return Vec::new();
    }
    let caps: Vec<u64> = capacities.iter().map(|&c| c.max(1) as u64).collect();
    let total: u64 = caps.iter().sum();
    let mut counts: Vec<usize> = caps
        .iter()
        .map(|&c| (n as u64 * c / total) as usize)
        .collect();
    let mut left = n - counts.iter().sum::<usize>();
    // Hand out the rest by largest remainder.
    let mut order: Vec<usize> = (0..caps.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(n as u64 * caps[i] % total));
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    let mut start = 0;
    counts
        .into_iter()
        .map(|c| {
            let r = start..start + c;
            start += c;
            r
        })
        .collect()
}

/// The frames two windows share, if any.
pub fn intersection(a: &Window, b: &Window) -> Option<Range<usize>> {
    let start = a.start.max(b.start);
    let end = a.end().min(b.end());
    (start < end).then_some(start..end)
}

/// For each window, the windows that overlap it and belong to another owner (ascending): its
/// halo partners under co-denoising.
pub fn halo_partners(windows: &[Window], owner: &[usize]) -> Vec<Vec<usize>> {
    (0..windows.len())
        .map(|w| {
            (0..windows.len())
                .filter(|&v| {
                    v != w
                        && owner[v] != owner[w]
                        && intersection(&windows[v], &windows[w]).is_some()
                })
                .collect()
        })
        .collect()
}

/// Little-endian f32 bytes → values (`None` unless the length is a multiple of 4).
pub fn f32s_from_le(bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::plan;

    #[test]
    fn split_is_contiguous_and_proportional() {
        assert_eq!(split_windows(14, &[1, 1, 1]), vec![0..5, 5..10, 10..14]);
        assert_eq!(split_windows(2, &[1, 1, 1]), vec![0..1, 1..2, 2..2]);
        assert_eq!(split_windows(6, &[2, 1]), vec![0..4, 4..6]);
        assert_eq!(split_windows(5, &[0, 4]), vec![0..1, 1..5]);
        assert_eq!(split_windows(1, &[1]), vec![0..1]);
        for n in 0..40 {
            for caps in [&[1u32][..], &[3, 1, 2], &[1, 1, 1, 1, 1], &[7, 0]] {
                let s = split_windows(n, caps);
                assert_eq!(s.len(), caps.len());
                assert_eq!(s.last().unwrap().end, n);
                assert!(s.windows(2).all(|p| p[0].end == p[1].start));
            }
        }
    }

    #[test]
    fn partners_are_remote_overlaps() {
        // T = 39, L = 21, O = 4: windows [0,21) [17,38) [18,39); the last overlaps both.
        let p = plan(39, 21, 4).unwrap();
        assert_eq!(p.windows.len(), 3);
        assert_eq!(
            halo_partners(&p.windows, &[0, 1, 2]),
            vec![vec![1, 2], vec![0, 2], vec![0, 1]]
        );
        assert_eq!(
            halo_partners(&p.windows, &[0, 0, 1]),
            vec![vec![2], vec![2], vec![0, 1]]
        );
        assert_eq!(
            halo_partners(&p.windows, &[0, 0, 0]),
            vec![Vec::<usize>::new(); 3]
        );
    }

    #[test]
    fn f32_bytes() {
        assert_eq!(
            f32s_from_le(&[0, 0, 128, 63, 0, 0, 0, 192]).unwrap(),
            vec![1.0, -2.0]
        );
        assert_eq!(f32s_from_le(&[0, 0, 0]), None);
    }
}
