//! The kernel's CPU list format (`0-3,8,10-11`), as found in sysfs and
//! written to `cpuset.cpus`.

use super::PlacementError;

/// Parses a CPU list; an empty or blank string is the empty list.
pub fn parse(text: &str) -> Result<Vec<u32>, PlacementError> {
    let mut out = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let bad = || PlacementError::CpuList {
            text: text.trim().to_string(),
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let a: u32 = a.trim().parse().map_err(|_| bad())?;
                let b: u32 = b.trim().parse().map_err(|_| bad())?;
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.trim().parse().map_err(|_| bad())?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Formats CPU ids as a compact list with ranges, in ascending order.
pub fn format(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_singles() {
        assert_eq!(
            parse("0-3,8,10-11\n").expect("list"),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse("").expect("empty"), Vec::<u32>::new());
        assert!(parse("3-1").is_err());
        assert!(parse("a").is_err());
    }

    #[test]
    fn formats_compactly() {
        assert_eq!(format(&[11, 0, 1, 2, 3, 8, 10]), "0-3,8,10-11");
        assert_eq!(format(&[]), "");
        assert_eq!(format(&[5]), "5");
    }
}
