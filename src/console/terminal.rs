//! The host terminal in raw mode, and its restoration on every way out.
//!
//! Raw mode is QEMU's for `-serial stdio` (`qemu_chr_set_echo_stdio`) with
//! signals off as in `-nographic`: no echo, no canonical mode, no ISIG (Ctrl-C,
//! Ctrl-Z and Ctrl-\ reach the guest as bytes), no CR/NL translation or
//! flow control on input, 8-bit characters, reads return each byte. Output
//! processing stays on (OPOST with the terminal's own ONLCR), so the VMM's
//! messages and the guest's "\r\n" both show right.
//!
//! The settings saved on entry live in one process-wide slot, with a
//! duplicate of the terminal's descriptor, so that [`restore`] can be
//! called from anywhere: the guard's `Drop` (normal exit, error return, a
//! panic that unwinds), the panic hook (a panic on any thread, before its
//! message is printed), and the signal thread before it ends the process.
//! Restoring takes the slot, so it happens once however many paths run.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Mutex, Once};

use nix::sys::termios::{
    tcgetattr, tcsetattr, ControlFlags, InputFlags, LocalFlags, OutputFlags, SetArg, SpecialCharacterIndices, Termios,
};

/// The terminal's settings before raw mode, and the terminal.
static SAVED: Mutex<Option<(OwnedFd, Termios)>> = Mutex::new(None);

static PANIC_HOOK: Once = Once::new();

/// Raw mode on a terminal; dropping it restores the saved settings.
#[derive(Debug)]
pub struct RawTerminal {
    _private: (),
}

impl RawTerminal {
    /// Saves `tty`'s settings and puts it in raw mode. Installs (once) a
    /// panic hook that restores the terminal before the panic message.
    pub fn enter(tty: &impl AsFd) -> nix::Result<Self> {
        let saved = tcgetattr(tty)?;
        let fd = tty.as_fd().try_clone_to_owned().map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(0)))?;
        install_panic_hook();
        // One raw terminal at a time: a second `enter` keeps the first
        // settings, so the cooked ones are never lost.
        lock().get_or_insert((fd, saved.clone()));
        let guard = Self { _private: () };
        // On failure the guard's drop puts back what was saved.
        tcsetattr(tty, SetArg::TCSANOW, &raw_mode(saved))?;
        Ok(guard)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}

/// `saved` with the changes of raw mode.
pub fn raw_mode(mut t: Termios) -> Termios {
    t.input_flags &= !(InputFlags::IGNBRK
        | InputFlags::BRKINT
        | InputFlags::PARMRK
        | InputFlags::ISTRIP
        | InputFlags::INLCR
        | InputFlags::IGNCR
        | InputFlags::ICRNL
        | InputFlags::IXON);
    t.output_flags |= OutputFlags::OPOST;
    t.local_flags &= !(LocalFlags::ECHO | LocalFlags::ECHONL | LocalFlags::ICANON | LocalFlags::IEXTEN | LocalFlags::ISIG);
    t.control_flags &= !(ControlFlags::CSIZE | ControlFlags::PARENB);
    t.control_flags |= ControlFlags::CS8;
    t.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
    t.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
    t
}

/// Puts the saved settings back, if raw mode is on; later calls do nothing.
/// Errors are ignored: after a hangup there is no terminal to restore.
pub fn restore() {
    if let Some((fd, saved)) = lock().take() {
        let _ = tcsetattr(&fd, SetArg::TCSANOW, &saved);
    }
}

fn lock() -> std::sync::MutexGuard<'static, Option<(OwnedFd, Termios)>> {
    // Nothing panics while the slot is held; a poisoned slot is still right.
    SAVED.lock().unwrap_or_else(|e| e.into_inner())
}

/// A panic on any thread restores the terminal, then reports as before.
fn install_panic_hook() {
    PANIC_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::pty::openpty;

    fn modes(t: &Termios) -> (InputFlags, OutputFlags, LocalFlags, ControlFlags, Vec<u8>) {
        (t.input_flags, t.output_flags, t.local_flags, t.control_flags, t.control_chars.to_vec())
    }

    #[test]
    fn raw_mode_clears_echo_canon_signals_and_keeps_opost() {
        let pty = openpty(None, None).unwrap();
        let cooked = tcgetattr(&pty.slave).unwrap();

        let raw = raw_mode(cooked.clone());

        assert!(!raw.local_flags.intersects(LocalFlags::ECHO | LocalFlags::ICANON | LocalFlags::ISIG));
        assert!(!raw.input_flags.intersects(InputFlags::ICRNL | InputFlags::IXON));
        assert!(raw.output_flags.contains(OutputFlags::OPOST));
        assert_eq!(
            raw.output_flags & OutputFlags::ONLCR,
            cooked.output_flags & OutputFlags::ONLCR,
            "output translation is the terminal's own"
        );
    }

    /// One test for the process-wide slot: the guard's drop, an unwinding
    /// panic with the guard leaked (only the hook can restore), and a
    /// second restore doing nothing.
    #[test]
    fn raw_terminal_restored_by_drop_and_by_panic_hook() {
        let pty = openpty(None, None).unwrap();
        let cooked = tcgetattr(&pty.slave).unwrap();

        let guard = RawTerminal::enter(&pty.slave).unwrap();
        let in_raw = tcgetattr(&pty.slave).unwrap();
        drop(guard);
        let after_drop = tcgetattr(&pty.slave).unwrap();

        let leaked = std::panic::catch_unwind(|| {
            std::mem::forget(RawTerminal::enter(&pty.slave).unwrap());
            panic!("test panic with the terminal raw");
        });
        let after_panic = tcgetattr(&pty.slave).unwrap();
        restore();

        assert!(!in_raw.local_flags.contains(LocalFlags::ECHO));
        assert_eq!(modes(&after_drop), modes(&cooked));
        assert!(leaked.is_err());
        assert_eq!(modes(&after_panic), modes(&cooked));
        assert_eq!(modes(&tcgetattr(&pty.slave).unwrap()), modes(&cooked));
    }
}
