//! A log file that stays bounded: lines appended, and at a size limit the file moved to
//! `<name>.1` (replacing the one before) and begun again. The Windows service's log
//! (`agent.log`), which has no journal to rotate it; plain so that it is tested everywhere.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// At most `limit` bytes in the file and as many in its `.1`, give or take a line.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    limit: u64,
    open: Option<(File, u64)>,
}

impl RotatingLog {
    /// A log at `path` (its directory made at the first line).
    pub fn new(path: &Path, limit: u64) -> Self {
        Self {
            path: path.to_owned(),
            limit,
            open: None,
        }
    }

    /// Where the lines before the last rotation are.
    pub fn previous(&self) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(".1");
        name.into()
    }

    /// Appends `line` whole, rotating first when it would take the file past the limit (a
    /// file holding anything is never left empty by a line larger than the limit).
    pub fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        if self.open.is_none() {
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            // A restarted service goes on counting from what the file holds.
            let size = file.metadata()?.len();
            self.open = Some((file, size));
        }
        let (_, size) = self.open.as_ref().expect("opened above");
        if *size > 0 && size + line.len() as u64 > self.limit {
            // Closed before the move: Windows moves no open file.
            let (file, size) = self.open.take().expect("opened above");
            drop(file);
            // The move can fail (someone reading the file without sharing delete): then the
            // line still goes in the same file, and the move is tried again at the next line.
            let moved = std::fs::rename(&self.path, self.previous()).is_ok();
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.open = Some((file, if moved { 0 } else { size }));
        }
        let (file, size) = self.open.as_mut().expect("opened above");
        file.write_all(line)?;
        *size += line.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::RotatingLog;

    #[test]
    fn the_log_rotates_at_its_limit_and_keeps_one_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs").join("agent.log");
        let mut log = RotatingLog::new(&path, 100);
        let lines: Vec<String> = (0..30).map(|i| format!("line {i:02} ........\n")).collect();
        for l in &lines {
            log.write_line(l.as_bytes()).unwrap();
        }
        let now = std::fs::read_to_string(&path).unwrap();
        let before = std::fs::read_to_string(log.previous()).unwrap();
        assert!(
            now.len() <= 100 && before.len() <= 100,
            "{now:?} {before:?}"
        );
        // The newest lines, in order, with nothing lost between the two files.
        let kept = format!("{before}{now}");
        let all = lines.concat();
        assert!(all.ends_with(&kept), "{kept:?}");
        assert!(now.ends_with(&lines[29]));
        assert!(!dir.path().join("logs").join("agent.log.2").exists());

        // A new writer (the service restarted) counts what the file already holds.
        let mut again = RotatingLog::new(&path, 100);
        let room = 100 - now.len();
        again.write_line(&vec![b'x'; room + 1]).unwrap();
        assert_eq!(std::fs::read_to_string(log.previous()).unwrap(), now);
    }

    #[test]
    fn a_rotation_that_cannot_move_the_file_keeps_logging_and_moves_it_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        let mut log = RotatingLog::new(&path, 10);
        // A non-empty directory where the previous file goes: the move fails.
        std::fs::create_dir_all(log.previous().join("busy")).unwrap();
        for l in ["one\n", "two\n", "three\n"] {
            log.write_line(l.as_bytes()).unwrap();
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\nthree\n");
        std::fs::remove_dir_all(log.previous()).unwrap();
        log.write_line(b"four\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "four\n");
        assert_eq!(
            std::fs::read_to_string(log.previous()).unwrap(),
            "one\ntwo\nthree\n"
        );
    }

    #[test]
    fn a_line_larger_than_the_limit_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        let mut log = RotatingLog::new(&path, 10);
        log.write_line(&[b'a'; 25]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), vec![b'a'; 25]);
        log.write_line(b"b\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"b\n");
        assert_eq!(std::fs::read(log.previous()).unwrap(), vec![b'a'; 25]);
    }
}
