//! The guest's VGA text screen, read back from RAM when the run ends.
//!
//! Many small kernels (the OSDev wiki's "Bare Bones" among them) print only
//! to the colour text buffer at 0xb8000, which QEMU and Bochs show in their
//! window. btvmm has no display: the buffer is plain RAM, and when the guest
//! stops, [`screen`] turns what it holds into text for the terminal, so such
//! a kernel's output is not lost. Linux, told there is no VGA (the zero page
//! says so), never writes there, and nothing is shown for it.

use btvmm_runtime::GuestMemory;

/// The colour text buffer (mode 3): `ROWS` rows of `COLUMNS` cells, each a
/// character byte and an attribute byte.
pub const TEXT_BUFFER: u64 = 0xb_8000;
const COLUMNS: usize = 80;
const ROWS: usize = 25;

/// The screen's rows as text (each cell's character; trailing blanks and
/// blank rows at the bottom left out), or `None` when the buffer shows
/// nothing (only NULs and spaces, or outside RAM). Characters outside
/// printable ASCII (code page 437's graphics) become '.'.
pub fn screen(mem: &GuestMemory) -> Option<String> {
    let size = (COLUMNS * ROWS * 2) as u64;
    if !mem.contains(TEXT_BUFFER, size) {
        return None;
    }
    let mut cells = vec![0u8; size as usize];
    mem.read(TEXT_BUFFER, &mut cells);
    let rows: Vec<String> = cells
        .chunks(COLUMNS * 2)
        .map(|row| {
            let text: String = row
                .chunks(2)
                .map(|cell| match cell[0] {
                    0 => ' ',
                    c @ 0x20..=0x7e => c as char,
                    _ => '.',
                })
                .collect();
            text.trim_end().to_string()
        })
        .collect();
    let shown = rows.iter().rposition(|r| !r.is_empty())? + 1;
    Some(rows[..shown].iter().map(|r| format!("{r}\n")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(mem: &GuestMemory, row: usize, col: usize, text: &[u8]) {
        for (i, &c) in text.iter().enumerate() {
            let at = TEXT_BUFFER + ((row * COLUMNS + col + i) * 2) as u64;
            mem.write(at, &[c, 0x07]);
        }
    }

    #[test]
    fn a_blank_screen_shows_nothing() {
        let mem = GuestMemory::new(1 << 20).unwrap();
        assert_eq!(screen(&mem), None);
        // Spaces with a colour (a cleared screen) are blank too.
        for i in 0..COLUMNS * ROWS {
            mem.write(TEXT_BUFFER + 2 * i as u64, &[b' ', 0x1f]);
        }
        assert_eq!(screen(&mem), None);
    }

    #[test]
    fn rows_come_back_as_text_up_to_the_last_written_one() {
        let mem = GuestMemory::new(1 << 20).unwrap();
        put(&mem, 0, 0, b"Hello, kernel World!");
        put(&mem, 2, 4, b"x\xc9y");
        assert_eq!(
            screen(&mem).as_deref(),
            Some("Hello, kernel World!\n\n    x.y\n")
        );
        put(&mem, ROWS - 1, COLUMNS - 1, b"z");
        let text = screen(&mem).unwrap();
        assert_eq!(text.lines().count(), ROWS);
        assert!(text.ends_with(&format!("{}z\n", " ".repeat(COLUMNS - 1))));
    }

    #[test]
    fn memory_too_small_for_the_buffer_shows_nothing() {
        let mem = GuestMemory::new(0xb_8000).unwrap();
        assert_eq!(screen(&mem), None);
    }
}
