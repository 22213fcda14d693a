using System.Runtime.InteropServices;
using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;

namespace UblkSharp.Targets.Cow;

/// <summary>
/// The file operations the COW target needs, as positional calls that return bytes done or a
/// negative errno. One implementation is a real file; tests substitute one that records every
/// operation and rebuilds what a crash at any point could leave on disk.
/// Every method may be called from several threads at once.
/// </summary>
internal abstract class CowStorage : IDisposable
{
    /// <summary>Reads at <paramref name="offset"/>; fewer bytes than asked only at the end of the file.</summary>
    public abstract int Read(Span<byte> buffer, long offset);

    /// <summary>Writes all of <paramref name="data"/>; 0 or a negative errno.</summary>
    public abstract int Write(ReadOnlySpan<byte> data, long offset);

    /// <summary>fdatasync: everything written before the call is durable when it returns 0.</summary>
    public abstract int Sync();

    /// <summary>fallocate(mode | KEEP_SIZE) over a range; -EOPNOTSUPP when the file system cannot.</summary>
    public abstract int Fallocate(FallocateMode mode, long offset, long length);

    /// <summary>
    /// Allocates the range's blocks (fallocate KEEP_SIZE, mode 0) without changing what it reads;
    /// -EOPNOTSUPP when the storage cannot (the default).
    /// </summary>
    public virtual int Allocate(long offset, long length) => -Errno.EOPNOTSUPP;

    public abstract long Length { get; }

    /// <summary>The file descriptor, for IO on a ring; -1 when there is none (a test's in-memory file).</summary>
    public virtual int Fd => -1;

    public void Dispose()
    {
        Dispose(true);
        GC.SuppressFinalize(this);
    }

    protected virtual void Dispose(bool disposing)
    {
    }

    /// <summary>Reads exactly <paramref name="buffer"/>.Length bytes, zero-filling past the end of the file (as UML does).</summary>
    public int ReadFull(Span<byte> buffer, long offset)
    {
        var done = 0;
        while (done < buffer.Length)
        {
            var n = Read(buffer[done..], offset + done);
            if (n < 0)
            {
                if (n == -Errno.EINTR || n == -Errno.EAGAIN)
                {
                    continue;
                }
                return n;
            }
            if (n == 0)
            {
                buffer[done..].Clear();
                break;
            }
            done += n;
        }
        return buffer.Length;
    }
}

/// <summary>A real file, by fd: pread, pwrite, fdatasync, fallocate.</summary>
internal sealed unsafe class FileCowStorage : CowStorage
{
    private const short F_RDLCK = 0;
    private const short F_WRLCK = 1;
    private int _fd;

    private FileCowStorage(int fd, string path, bool isBlockDevice)
    {
        _fd = fd;
        Path = path;
        IsBlockDevice = isBlockDevice;
    }

    public string Path { get; }

    public bool IsBlockDevice { get; }

    public override int Fd => _fd;

    /// <summary>
    /// Opens a file and takes an open-file-description lock on it: shared for reading, exclusive
    /// for writing. OFD locks conflict with the POSIX fcntl locks UML takes, so UML and this
    /// target never write one COW file at once.
    /// </summary>
    public static FileCowStorage Open(string path, bool writable, bool create = false, bool exclusiveLock = false)
    {
        var flags = (writable ? Libc.O_RDWR : Libc.O_RDONLY) | (create ? Libc.O_CREAT | Libc.O_EXCL : 0);
        var fd = Libc.OpenOrThrow(path, flags, 0x1a4);
        try
        {
            var lockType = writable || exclusiveLock ? F_WRLCK : F_RDLCK;
            // A process that forks holds our open files until it execs: a conflict can be that
            // brief. A real holder (UML, a device) is still there after a second of retries.
            var errno = 0;
            for (var attempt = 0; attempt < 100 && !Lock(fd, lockType, out errno) && errno is Errno.EAGAIN or Errno.EACCES; attempt++)
            {
                Thread.Sleep(10);
            }
            if (errno != 0)
            {
                if (errno is Errno.EAGAIN or Errno.EACCES)
                {
                    throw new FileLockedException($"{path} is in use by another process (it holds a lock on it: a running UML or another ublksharp device)");
                }
                // Some file systems (e.g. 9p) have no locks; working without one beats refusing.
            }
            ulong bytes = 0;
            var isBlock = Libc.ioctl(fd, Libc.BLKGETSIZE64, &bytes) == 0;
            return new FileCowStorage(fd, path, isBlock);
        }
        catch
        {
            _ = Libc.close(fd);
            throw;
        }
    }

    private static bool Lock(int fd, short type, out int errno)
    {
        // struct flock: l_type, l_whence (shorts), l_start, l_len (64-bit), l_pid; 32 bytes on x86-64 and arm64.
        var flock = stackalloc byte[32];
        new Span<byte>(flock, 32).Clear();
        *(short*)flock = type;
        if (Libc.fcntl(fd, Libc.F_OFD_SETLK, flock) == 0)
        {
            errno = 0;
            return true;
        }
        errno = Marshal.GetLastPInvokeError();
        return false;
    }

    public override long Length
    {
        get
        {
            ulong bytes = 0;
            if (IsBlockDevice && Libc.ioctl(_fd, Libc.BLKGETSIZE64, &bytes) == 0)
            {
                return (long)bytes;
            }
            var off = Libc.lseek(_fd, 0, Libc.SEEK_END);
            return off < 0 ? throw new ErrnoException(Marshal.GetLastPInvokeError(), $"lseek {Path}") : off;
        }
    }

    public override int Read(Span<byte> buffer, long offset)
    {
        fixed (byte* p = buffer)
        {
            while (true)
            {
                var n = Libc.pread(_fd, p, (nuint)buffer.Length, offset);
                if (n >= 0)
                {
                    return (int)n;
                }
                var e = Marshal.GetLastPInvokeError();
                if (e != Errno.EINTR)
                {
                    return -e;
                }
            }
        }
    }

    public override int Write(ReadOnlySpan<byte> data, long offset)
    {
        fixed (byte* p = data)
        {
            var done = 0;
            while (done < data.Length)
            {
                var n = Libc.pwrite(_fd, p + done, (nuint)(data.Length - done), offset + done);
                if (n < 0)
                {
                    var e = Marshal.GetLastPInvokeError();
                    if (e == Errno.EINTR)
                    {
                        continue;
                    }
                    return -e;
                }
                if (n == 0)
                {
                    return -Errno.EIO;
                }
                done += (int)n;
            }
            return 0;
        }
    }

    public override int Sync()
    {
        while (Libc.fdatasync(_fd) != 0)
        {
            var e = Marshal.GetLastPInvokeError();
            if (e != Errno.EINTR)
            {
                return -e;
            }
        }
        return 0;
    }

    public override int Fallocate(FallocateMode mode, long offset, long length)
        => Libc.fallocate(_fd, (int)(mode | FallocateMode.KeepSize), offset, length) == 0 ? 0 : -Marshal.GetLastPInvokeError();

    public override int Allocate(long offset, long length) => Fallocate(FallocateMode.None, offset, length);

    /// <summary>Sets the file's length (a new COW file is sparse up to the end of its data area).</summary>
    public void Truncate(long length)
    {
        if (Libc.ftruncate(_fd, length) != 0)
        {
            throw new ErrnoException(Marshal.GetLastPInvokeError(), $"ftruncate {Path}");
        }
    }

    protected override void Dispose(bool disposing)
    {
        var fd = Interlocked.Exchange(ref _fd, -1);
        if (fd >= 0)
        {
            _ = Libc.close(fd);
        }
        base.Dispose(disposing);
    }

    /// <summary>The absolute path UML's absolutize() gives: the directory's real path (symlinks resolved) plus the file name.</summary>
    public static string Absolutize(string path)
    {
        var full = System.IO.Path.GetFullPath(path);
        var dir = System.IO.Path.GetDirectoryName(full);
        if (dir is null)
        {
            return full;
        }
        var real = Libc.realpath(dir, null);
        if (real == 0)
        {
            throw new ErrnoException(Marshal.GetLastPInvokeError(), $"realpath {dir}");
        }
        try
        {
            var resolved = Marshal.PtrToStringUTF8(real)!;
            return resolved == "/" ? "/" + System.IO.Path.GetFileName(full) : resolved + "/" + System.IO.Path.GetFileName(full);
        }
        finally
        {
            NativeMemory.Free((void*)real);
        }
    }

    /// <summary>st_mtime in seconds, as UML's os_file_modtime() reports it.</summary>
    public static long ModificationTime(string path)
        => new DateTimeOffset(File.GetLastWriteTimeUtc(path)).ToUnixTimeSeconds();
}

/// <summary>A file another process holds locked (a running UML, or another daemon serving it).</summary>
public sealed class FileLockedException(string message) : TargetLockedException(message);
