using System.Runtime.InteropServices;
using UblkSharp.Interop;

namespace UblkSharp.Runtime;

/// <summary>
/// The directory of device records, daemon logs and readiness reports (/run/ublksharp, or
/// UBLKSHARP_RUN_DIR). A root daemon rebuilds targets from its records and del signals the pids
/// they name, so whoever can write there controls both: it must belong to root (or to this user)
/// and be writable by nobody else. Its files are for their owner only.
/// </summary>
public static class StateDirectory
{
    private const UnixFileMode OwnerOnly = UnixFileMode.UserRead | UnixFileMode.UserWrite;

    /// <summary>Refuses <paramref name="path"/> unless it is owned by root or this user and no group or other can write it; a missing directory passes.</summary>
    public static unsafe void Verify(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        Libc.Statx st;
        if (Libc.statx(Libc.AT_FDCWD, path, 0, Libc.STATX_BASIC_STATS, &st) < 0)
        {
            var errno = Marshal.GetLastPInvokeError();
            if (errno == Errno.ENOENT)
            {
                return;
            }
            throw new ErrnoException(errno, $"stat {path}");
        }
        const int S_IFMT = 0xf000, S_IFDIR = 0x4000;
        if ((st.stx_mode & S_IFMT) != S_IFDIR)
        {
            throw new UnsafeStateDirectoryException($"the state directory {path} is not a directory");
        }
        var euid = Libc.geteuid();
        if (st.stx_uid != 0 && st.stx_uid != euid)
        {
            throw new UnsafeStateDirectoryException(
                $"refusing the state directory {path}: it belongs to uid {st.stx_uid}, not to root{(euid == 0 ? "" : $" or uid {euid}")} (set UBLKSHARP_RUN_DIR to a directory of your own)");
        }
        if ((st.stx_mode & 0x12) != 0) // S_IWGRP | S_IWOTH
        {
            throw new UnsafeStateDirectoryException(
                $"refusing the state directory {path}: group or others may write to it (mode {Convert.ToString(st.stx_mode & 0xfff, 8)}); 'chmod go-w {path}' or set UBLKSHARP_RUN_DIR to another directory");
        }
    }

    /// <summary>
    /// Why a state file (a device's recipe) of owner <paramref name="uid"/> and <paramref name="mode"/>
    /// must not be trusted, or null if it may: it must be a regular file of root (or of
    /// <paramref name="euid"/>, the user running ublksharp) that no group or other may write. A recipe
    /// names the files a root daemon opens and serves, so whoever can change it chooses them.
    /// </summary>
    public static string? FileProblem(string path, uint uid, uint mode, uint euid)
    {
        const uint S_IFMT = 0xf000, S_IFREG = 0x8000;
        if ((mode & S_IFMT) != S_IFREG)
        {
            return $"refusing {path}: it is not a regular file";
        }
        if (uid != 0 && uid != euid)
        {
            return $"refusing {path}: it belongs to uid {uid}, not to root{(euid == 0 ? "" : $" or uid {euid}")}; a recipe only its owner wrote is trusted (if you did not write it, delete it)";
        }
        if ((mode & 0x12) != 0) // S_IWGRP | S_IWOTH
        {
            return $"refusing {path}: group or others may write to it (mode {Convert.ToString(mode & 0xfff, 8)}); 'chmod go-w {path}' if its content is yours, else delete it";
        }
        return null;
    }

    /// <summary>
    /// The text of state file <paramref name="path"/>, checked (<see cref="FileProblem"/>) on the very
    /// file read; throws <see cref="UnsafeStateFileException"/> if it must not be trusted, and
    /// <see cref="FileNotFoundException"/> if it is missing.
    /// </summary>
    public static unsafe string ReadVerified(string path)
    {
        using var handle = File.OpenHandle(path, FileMode.Open, FileAccess.Read);
        Libc.Statx st;
        if (Libc.statx((int)handle.DangerousGetHandle(), "", Libc.AT_EMPTY_PATH, Libc.STATX_BASIC_STATS, &st) < 0)
        {
            throw new ErrnoException(Marshal.GetLastPInvokeError(), $"stat {path}");
        }
        if (FileProblem(path, st.stx_uid, st.stx_mode, Libc.geteuid()) is string problem)
        {
            throw new UnsafeStateFileException(problem);
        }
        var length = RandomAccess.GetLength(handle);
        if (length > 1 << 20)
        {
            throw new UnsafeStateFileException($"refusing {path}: {length} bytes is too long for a recipe");
        }
        var bytes = new byte[length];
        var done = 0;
        while (done < bytes.Length)
        {
            var n = RandomAccess.Read(handle, bytes.AsSpan(done), done);
            if (n == 0)
            {
                break;
            }
            done += n;
        }
        return System.Text.Encoding.UTF8.GetString(bytes, 0, done);
    }

    /// <summary>Creates <paramref name="path"/> (for its owner only) if it is missing, then <see cref="Verify"/>s it.</summary>
    public static void Ensure(string path)
    {
        if (OperatingSystem.IsWindows())
        {
            throw new PlatformNotSupportedException();
        }
        Verify(path);
        Directory.CreateDirectory(path, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        Verify(path);
    }

    /// <summary>Writes <paramref name="path"/> whole, readable by its owner only: a temp file renamed over it, so a reader never sees half of it.</summary>
    public static void WriteAtomically(string path, string text)
    {
        ArgumentNullException.ThrowIfNull(path);
        if (OperatingSystem.IsWindows())
        {
            throw new PlatformNotSupportedException();
        }
        var tmp = path + $".tmp{Environment.ProcessId}";
        using (var f = new FileStream(tmp, new FileStreamOptions { Mode = FileMode.Create, Access = FileAccess.Write, UnixCreateMode = OwnerOnly }))
        {
            // FileMode.Create keeps the mode of a leftover temp file: set it outright.
            File.SetUnixFileMode(f.SafeFileHandle, OwnerOnly);
            using var w = new StreamWriter(f);
            w.Write(text);
        }
        File.Move(tmp, path, overwrite: true);
    }

    /// <summary>Creates the new, empty file <paramref name="path"/>, readable by its owner only (a log others append to).</summary>
    public static void CreateFile(string path)
    {
        if (OperatingSystem.IsWindows())
        {
            throw new PlatformNotSupportedException();
        }
        new FileStream(path, new FileStreamOptions { Mode = FileMode.CreateNew, Access = FileAccess.Write, UnixCreateMode = OwnerOnly }).Dispose();
    }
}

/// <summary>The state directory may be written by someone other than its owner (said in words for the user).</summary>
public sealed class UnsafeStateDirectoryException(string message) : IOException(message);

/// <summary>A state file (a device's recipe) someone other than its owner may have written (said in words for the user).</summary>
public sealed class UnsafeStateFileException(string message) : IOException(message);
