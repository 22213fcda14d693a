using System.Globalization;
using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;
using UblkSharp.Interop;

namespace UblkSharp.Runtime;

/// <summary>Another process is taking the device over right now (said in words for the user).</summary>
public sealed class TakeoverInProgressException(string message) : IOException(message);

/// <summary>
/// The per-device takeover lock: an exclusive flock on /run/ublksharp/ID.lock, held by whoever
/// takes a device over from a daemon (<see cref="UblkDevice.Recover"/>, and a planned upgrade),
/// from before START_USER_RECOVERY until END_USER_RECOVERY succeeded or the attempt was given up.
/// Two takeovers at once would both pass the state checks and then fight over /dev/ublkcN; with the
/// lock one wins and the other is refused before it changes anything. The kernel drops the lock
/// when its holder dies, so a crashed recovery never leaves it stuck. The file stays: unlinking
/// it while someone waits to open it would let two holders lock two different files.
/// </summary>
public sealed class TakeoverLock : IDisposable
{
    // The stream owns the descriptor the flock is on; it lives as long as the lock.
    private readonly FileStream _file;

    private TakeoverLock(uint id, FileStream file)
    {
        Id = id;
        _file = file;
    }

    public uint Id { get; }

    public static string PathFor(uint id) => PathFor(DeviceRecord.Directory, id);

    private static string PathFor(string directory, uint id) => Path.Combine(directory, $"{id}.lock");

    /// <summary>
    /// Takes the lock of device <paramref name="id"/> for <paramref name="purpose"/> (recorded in
    /// the file, so a refused taker can say who holds it); throws
    /// <see cref="TakeoverInProgressException"/> if another process holds it.
    /// </summary>
    public static TakeoverLock Take(uint id, string purpose) => Take(DeviceRecord.Directory, id, purpose);

    // In <paramref name="directory"/> rather than the state directory (host tests).
    internal static TakeoverLock Take(string directory, uint id, string purpose)
    {
        if (OperatingSystem.IsWindows())
        {
            throw new PlatformNotSupportedException();
        }
        StateDirectory.Ensure(directory);
        var path = PathFor(directory, id);
        // open(2) itself: .NET's FileStream takes a flock of its own on open (LOCK_SH), and two
        // takers that both hold LOCK_SH could never upgrade to LOCK_EX.
        var fd = Libc.open(path, Libc.O_RDWR | Libc.O_CREAT | Libc.O_CLOEXEC, 0x180 /* 0600 */);
        if (fd < 0)
        {
            throw new ErrnoException(Marshal.GetLastPInvokeError(), $"open {path}");
        }
        var file = new FileStream(new SafeFileHandle(fd, ownsHandle: true), FileAccess.ReadWrite, bufferSize: 0);
        try
        {
            if (Libc.flock((int)file.SafeFileHandle.DangerousGetHandle(), Libc.LOCK_EX | Libc.LOCK_NB) != 0)
            {
                var errno = Marshal.GetLastPInvokeError();
                if (errno != Errno.EAGAIN)
                {
                    throw new ErrnoException(errno, $"flock {path}");
                }
                throw InProgress(path, id);
            }
            var text = System.Text.Encoding.UTF8.GetBytes(string.Create(CultureInfo.InvariantCulture, $"pid {Environment.ProcessId}, {purpose}\n"));
            file.SetLength(0);
            file.Write(text);
            file.Flush();
            return new TakeoverLock(id, file);
        }
        catch
        {
            file.Dispose(); // closing the only descriptor drops a lock taken on it
            throw;
        }
    }

    /// <summary>Whether some process holds the lock of device <paramref name="id"/> now, read from /proc/locks so that looking never takes it.</summary>
    public static bool IsHeld(uint id) => IsHeld(DeviceRecord.Directory, id);

    internal static unsafe bool IsHeld(string directory, uint id)
    {
        Libc.Statx st;
        if (Libc.statx(Libc.AT_FDCWD, PathFor(directory, id), 0, Libc.STATX_BASIC_STATS, &st) < 0)
        {
            return false; // never taken
        }
        // "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF" (device numbers in hex, the inode in decimal).
        var key = string.Create(CultureInfo.InvariantCulture, $"{st.stx_dev_major:x2}:{st.stx_dev_minor:x2}:{st.stx_ino}");
        try
        {
            return File.ReadLines("/proc/locks").Any(l =>
                l.Split(' ', StringSplitOptions.RemoveEmptyEntries) is [_, "FLOCK", _, _, _, var file, ..] && file == key);
        }
        catch (IOException)
        {
            return false;
        }
    }

    /// <summary>Throws <see cref="TakeoverInProgressException"/> if some process holds the lock of device <paramref name="id"/> now.</summary>
    public static void RefuseIfHeld(uint id)
    {
        if (IsHeld(id))
        {
            throw InProgress(PathFor(id), id);
        }
    }

    private static TakeoverInProgressException InProgress(string path, uint id) => new(
        $"another recovery (or upgrade) of device {id} is in progress{Holder(path)}; nothing was changed: try again once it has finished");

    // ": pid N, recover" from the holder's note; empty if it has not written it yet.
    private static string Holder(string path)
    {
        // Not File.ReadAllText: its open would take .NET's LOCK_SH, which the holder's lock refuses.
        var fd = Libc.open(path, Libc.O_RDONLY | Libc.O_CLOEXEC, 0);
        if (fd < 0)
        {
            return "";
        }
        using var reader = new StreamReader(new FileStream(new SafeFileHandle(fd, ownsHandle: true), FileAccess.Read, bufferSize: 0));
        var note = reader.ReadToEnd().Trim();
        return note.Length == 0 ? "" : $" ({note})";
    }

    public void Dispose() => _file.Dispose();
}
