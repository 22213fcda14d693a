using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;
using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;
using UblkSharp.Ublk;

namespace UblkSharp.Targets;

/// <summary>
/// A file or block device as a disk, like the kernel's loop driver. IO goes on each queue's own
/// io_uring with the backing file registered as a fixed file: flush is fdatasync, discard punches
/// a hole, write-zeroes is FALLOC_FL_ZERO_RANGE and FUA is a RWF_DSYNC write. A file on tmpfs or
/// ramfs is served on the queue thread instead, through its mapping (see <see cref="UsesRing"/>).
/// </summary>
public sealed unsafe class LoopTarget : BlockTarget, IUserCopyTarget
{
    private const int BounceAlignment = 4096;
    private const int PageShift = 12;
    // Above this the page bitmap (size / 32768 bytes) is not worth it: such files take the two-copy path.
    private const long MaxMappedBytes = 64L << 30;
    private readonly MappedMemory? _map;
    private readonly long[] _present = [];
    private long _lastTouch;
    private int _untouchedWrites;
    private readonly int _fd;
    private readonly SafeFileHandle _handle;
    private readonly bool _readOnly;
    private readonly LoopIo _io;

    public LoopTarget(string path, bool directIo = false, bool readOnly = false, LoopIo io = LoopIo.Auto)
    {
        ArgumentNullException.ThrowIfNull(path);
        Path = path;
        DirectIo = directIo;
        _readOnly = readOnly;
        _io = io;
        if (Directory.Exists(path))
        {
            throw new ArgumentException($"{path} is a directory, not a file or block device");
        }
        var flags = (readOnly ? Libc.O_RDONLY : Libc.O_RDWR) | (directIo ? Libc.O_DIRECT : 0);
        _fd = Libc.OpenOrThrow(path, flags);
        _handle = new SafeFileHandle(_fd, ownsHandle: true);
        ulong bytes = 0;
        if (Libc.ioctl(_fd, Libc.BLKGETSIZE64, &bytes) == 0)
        {
            IsBlockDevice = true;
        }
        else
        {
            bytes = (ulong)RandomAccess.GetLength(_handle);
        }
        UsesRing = io switch
        {
            LoopIo.Ring => true,
            LoopIo.Sync => false,
            _ => IsBlockDevice || !IsMemoryFileSystem(_fd),
        };
        // Like the loop driver, a tail shorter than a sector is not part of the device.
        _size = (long)bytes & ~511L;
        if (_size == 0)
        {
            _handle.Dispose();
            throw new ArgumentException($"{path} is {bytes} bytes: a loop device needs at least 512");
        }
        if (!UsesRing && !IsBlockDevice && _size <= MaxMappedBytes && IsMemoryFileSystem(_fd))
        {
            try
            {
                _map = MappedMemory.Map(_fd, 0, (nuint)_size, Libc.PROT_READ | (readOnly ? 0 : Libc.PROT_WRITE), Libc.MAP_SHARED, $"loop backing file {path}");
                _present = new long[((_size >> PageShift) + 64) / 64];
                FindData();
            }
            catch (ErrnoException)
            {
                _map = null; // the two-copy path serves as well
            }
        }
    }

    public string Path { get; }

    public bool DirectIo { get; }

    public bool IsBlockDevice { get; }

    /// <summary>Whether ublk queues do this file's IO on their io_uring (else synchronously on the queue thread).</summary>
    public bool UsesRing { get; }

    internal static bool IsMemoryFileSystem(int fd)
    {
        var buf = stackalloc long[16]; // struct statfs: f_type first, 120 bytes on 64-bit Linux
        return Libc.fstatfs(fd, buf) == 0 && buf[0] is Libc.TMPFS_MAGIC or Libc.RAMFS_MAGIC;
    }

    private long _size;

    public override long Size => Volatile.Read(ref _size);

    // The tmpfs mapping covers the file as it was opened; IO past it (after a resize) takes pread/pwrite.
    private long MappedBytes => _map is null ? 0 : (long)_map.Length;

    public override bool CanResize => !_readOnly;

    /// <summary>
    /// The device takes a new size. The backing file must hold it: a regular file is extended
    /// (ftruncate, a sparse tail of zeros) only with <paramref name="growBacking"/>, and never cut
    /// on a shrink (what lies past the new end stays in the file); a block device cannot grow.
    /// </summary>
    public override void Resize(long newSize, bool growBacking)
    {
        ObjectDisposedException.ThrowIf(_handle.IsClosed, this);
        if (_readOnly)
        {
            throw new NotSupportedException($"{Path} is served read-only: the device cannot change its size");
        }
        ulong bytes = 0;
        var have = Libc.ioctl(_fd, Libc.BLKGETSIZE64, &bytes) == 0 ? (long)bytes : RandomAccess.GetLength(_handle);
        if (have < newSize)
        {
            if (IsBlockDevice || !growBacking)
            {
                throw new InvalidOperationException($"{Path} is {have} bytes, less than {newSize}: " +
                    (IsBlockDevice ? "a backing block device cannot be grown from here" : "grow the file first, or pass --grow-file"));
            }
            RandomAccess.SetLength(_handle, newSize);
        }
        Volatile.Write(ref _size, newSize);
    }

    public override string Kind => "loop";

    public override IReadOnlyDictionary<string, string> Recipe
    {
        get
        {
            var recipe = new Dictionary<string, string>
            {
                ["file"] = Path,
                ["direct-io"] = DirectIo ? "on" : "off",
                ["read-only"] = _readOnly ? "on" : "off",
            };
            if (_io != LoopIo.Auto)
            {
                // A recovered zero-copy device needs the ring again (its kernel flags say AUTO_BUF_REG).
                recipe["io"] = _io == LoopIo.Ring ? "ring" : "sync";
            }
            return recipe;
        }
    }

    public override bool IsReadOnly => _readOnly;

    public override bool HasVolatileCache => true;

    public override bool SurvivesRestart => true;

    public override bool HasNativeFua => true;

    public override bool CanDiscard => !_readOnly;

    public override bool CanWriteZeroes => !_readOnly;

    // The synchronous path: ublk queues use it when the ring cannot serve the file inline (tmpfs),
    // and callers outside a queue (an NBD export) always do.
    public override int Read(Span<byte> buffer, long offset)
    {
        fixed (byte* p = buffer)
        {
            if (NeedsBounce(p))
            {
                return Bounced(buffer.Length, offset, null, p);
            }
            var n = Libc.pread(_fd, p, (nuint)buffer.Length, offset);
            return n >= 0 ? (int)n : -Marshal.GetLastPInvokeError();
        }
    }

    public override int Write(ReadOnlySpan<byte> data, long offset) => Write(data, offset, 0);

    /// <summary>A RWF_DSYNC write: durable on return, like the ring's FUA write.</summary>
    public override int WriteFua(ReadOnlySpan<byte> data, long offset) => Write(data, offset, Libc.RWF_DSYNC);

    private int Write(ReadOnlySpan<byte> data, long offset, int rwFlags)
    {
        if (_readOnly)
        {
            // The fd is O_RDONLY: EBADF would say less than this.
            return -Errno.EROFS;
        }
        fixed (byte* p = data)
        {
            if (NeedsBounce(p))
            {
                return Bounced(data.Length, offset, p, null, rwFlags);
            }
            return PWrite(p, data.Length, offset, rwFlags);
        }
    }

    private int PWrite(byte* p, int length, long offset, int rwFlags)
    {
        nint n;
        if (rwFlags == 0)
        {
            n = Libc.pwrite(_fd, p, (nuint)length, offset);
        }
        else
        {
            var iov = new Iovec { iov_base = p, iov_len = (nuint)length };
            n = Libc.pwritev2(_fd, &iov, 1, offset, rwFlags);
        }
        if (n > 0 && _map is not null && offset < MappedBytes)
        {
            SetPresent(offset, Math.Min(n, MappedBytes - offset), true);
        }
        return n >= 0 ? (int)n : -Marshal.GetLastPInvokeError();
    }

    // O_DIRECT wants aligned memory; a queue's buffers are page-aligned, a caller's managed array need not be.
    private bool NeedsBounce(byte* p) => DirectIo && ((nuint)p & (BounceAlignment - 1)) != 0;

    /// <summary>An O_DIRECT read or write through an aligned copy of the caller's unaligned buffer.</summary>
    private int Bounced(int length, long offset, byte* from, byte* to, int rwFlags = 0)
    {
        var bounce = (byte*)NativeMemory.AlignedAlloc((nuint)Math.Max(length, 1), BounceAlignment);
        try
        {
            if (from != null)
            {
                Buffer.MemoryCopy(from, bounce, length, length);
                return PWrite(bounce, length, offset, rwFlags);
            }
            var n = Libc.pread(_fd, bounce, (nuint)length, offset);
            if (n < 0)
            {
                return -Marshal.GetLastPInvokeError();
            }
            Buffer.MemoryCopy(bounce, to, length, n);
            return (int)n;
        }
        finally
        {
            NativeMemory.AlignedFree(bounce);
        }
    }

    public override int Flush() => Libc.fdatasync(_fd) == 0 ? 0 : -Marshal.GetLastPInvokeError();

    public override int Discard(long offset, long length)
        => _readOnly ? -Errno.EROFS : Fallocate(FallocateMode.PunchHole | FallocateMode.KeepSize, offset, length);

    private void Punched(long offset, long length)
    {
        var n = Math.Min(length, MappedBytes - offset);
        if (_map is not null && offset >= 0 && n > 0)
        {
            SetPresent(offset, n, false);
        }
    }

    /// <summary>As the kernel's loop driver: ZERO_RANGE when the range must stay allocated, else a hole; writes of zeros where the file system has neither.</summary>
    public override int WriteZeroes(long offset, long length, bool mayUnmap)
    {
        if (_readOnly)
        {
            return -Errno.EROFS;
        }
        var r = Fallocate(ZeroesMode(mayUnmap), offset, length);
        if (r == -Errno.EOPNOTSUPP && !mayUnmap)
        {
            r = Fallocate(FallocateMode.PunchHole | FallocateMode.KeepSize, offset, length);
        }
        return r == -Errno.EOPNOTSUPP ? base.WriteZeroes(offset, length, mayUnmap) : r;
    }

    private static FallocateMode ZeroesMode(bool mayUnmap)
        => (mayUnmap ? FallocateMode.PunchHole : FallocateMode.ZeroRange) | FallocateMode.KeepSize;

    /// <summary>On a regular file, zeroing is fallocate (metadata only); a block device may write zeros.</summary>
    public override bool CanFastZero => !_readOnly && !IsBlockDevice;

    /// <summary>The file's holes (lseek SEEK_DATA/SEEK_HOLE), which read as zeros.</summary>
    public override long GetAllocation(long offset, long length, out AllocationFlags flags)
    {
        flags = AllocationFlags.None;
        if (IsBlockDevice)
        {
            return length;
        }
        var n = FileRanges.Run(_fd, offset, length, out var hole);
        if (n <= 0)
        {
            return length; // the file system cannot tell: report data
        }
        if (hole)
        {
            flags = AllocationFlags.Hole | AllocationFlags.Zero;
        }
        return n;
    }

    public override int Cache(long offset, long length) => FileRanges.WillNeed(_fd, offset, length);

    private int Fallocate(FallocateMode mode, long offset, long length)
    {
        // Whatever happens, the range may hold holes now: reads of it take pread.
        Punched(offset, length);
        return Libc.fallocate(_fd, (int)mode, offset, length) == 0 ? 0 : -Marshal.GetLastPInvokeError();
    }

    /// <summary>
    /// On tmpfs and ramfs the file is mapped, and a request's data moves between the page cache and
    /// the request in one copy (USER_COPY: pread/pwrite of /dev/ublkcN into or out of the mapping)
    /// rather than two (the driver's into the tag's buffer, then the file's). Only the daemon's kernel
    /// side touches the mapping, so a file truncated behind our back fails a copy with EFAULT, which
    /// falls back to pread/pwrite (EOF handling as usual), rather than raising SIGBUS.
    /// </summary>
    bool IUserCopyTarget.WantsUserCopy => _map is not null;

    int IUserCopyTarget.ReadToRequest(int charFd, long requestPosition, long offset, int length)
    {
        // A hole read through a shared tmpfs mapping would allocate pages: holes take pread, which does not.
        if (_map is null || offset + length > MappedBytes || !AllPresent(offset, length))
        {
            return IUserCopyTarget.NotDirect;
        }
        var n = Libc.pwrite(charFd, _map.Pointer + offset, (nuint)length, requestPosition);
        return n == length ? length : IUserCopyTarget.NotDirect;
    }

    int IUserCopyTarget.WriteFromRequest(int charFd, long requestPosition, long offset, int length, bool fua)
    {
        // FUA needs nothing more: tmpfs and ramfs have no stable storage to reach (their fdatasync is a no-op).
        if (_map is null || _readOnly || offset + length > MappedBytes)
        {
            return IUserCopyTarget.NotDirect;
        }
        var n = Libc.pread(charFd, _map.Pointer + offset, (nuint)length, requestPosition);
        if (n <= 0)
        {
            return IUserCopyTarget.NotDirect;
        }
        SetPresent(offset, n, true); // whatever was copied is allocated now, even if the copy fell short
        if (n != length)
        {
            return IUserCopyTarget.NotDirect;
        }
        TouchAfterMappedWrite();
        return length;
    }

    // Stores through a mapping do not update mtime as write() does: do it at most once a second, and on close.
    private void TouchAfterMappedWrite()
    {
        var now = Environment.TickCount64;
        if (now - Volatile.Read(ref _lastTouch) >= 1000)
        {
            Volatile.Write(ref _lastTouch, now);
            Volatile.Write(ref _untouchedWrites, 0);
            _ = Libc.futimens(_fd, null);
        }
        else
        {
            Volatile.Write(ref _untouchedWrites, 1);
        }
    }

    /// <summary>Marks the pages that hold data now (SEEK_DATA/SEEK_HOLE; tmpfs answers per page).</summary>
    private void FindData()
    {
        for (long offset = 0; offset < MappedBytes;)
        {
            var n = FileRanges.Run(_fd, offset, MappedBytes - offset, out var hole);
            if (n <= 0)
            {
                return; // cannot tell: the rest stays "hole", served by pread
            }
            if (!hole)
            {
                SetPresent(offset, n, true);
            }
            offset += n;
        }
    }

    // A bit per page of the file: set where the page surely holds data (reads of it may use the
    // mapping), clear where it may be a hole. Clearing too much only costs a copy; setting too much
    // would allocate pages a read touches, so writes set and discards clear, conservatively.
    private void SetPresent(long offset, long length, bool present)
    {
        var first = offset >> PageShift;
        var last = (offset + length - 1) >> PageShift;
        for (var word = first >> 6; word <= last >> 6; word++)
        {
            var lo = word == first >> 6 ? (int)(first & 63) : 0;
            var hi = word == last >> 6 ? (int)(last & 63) : 63;
            var mask = (hi == 63 ? ~0L : (1L << (hi + 1)) - 1) & ~((1L << lo) - 1);
            if (present)
            {
                Interlocked.Or(ref _present[word], mask);
            }
            else
            {
                Interlocked.And(ref _present[word], ~mask);
            }
        }
    }

    private bool AllPresent(long offset, long length)
    {
        var first = offset >> PageShift;
        var last = (offset + length - 1) >> PageShift;
        for (var page = first; page <= last; page++)
        {
            if ((Volatile.Read(ref _present[page >> 6]) & (1L << (int)(page & 63))) == 0)
            {
                return false;
            }
        }
        return true;
    }

    /// <summary>
    /// The ring, unless the file is one io_uring cannot read or write inline: on tmpfs and ramfs
    /// (no FMODE_NOWAIT up to at least Linux 6.12) every step would be punted to an io-wq worker, a
    /// thread hop per request for what is a memcpy, so the queue thread does it itself.
    /// </summary>
    public override UringBackend? CreateUringBackend(int queueId) => UsesRing ? new Backend(_fd) : null;

    /// <summary>Where the ring serves the file: the file's IO then moves the request's pages directly (no tmpfs mapping to copy through).</summary>
    public override bool SupportsZeroCopy => UsesRing;

    protected override void Dispose(bool disposing)
    {
        if (_map is not null)
        {
            if (Volatile.Read(ref _untouchedWrites) != 0)
            {
                _ = Libc.futimens(_fd, null);
            }
            _map.Dispose();
        }
        _handle.Dispose();
        base.Dispose(disposing);
    }

    private sealed class Backend(int fd) : UringBackend
    {
        private readonly int[] _files = [fd];

        public override IReadOnlyList<int> Files => _files;

        public override void Prepare(ref Sqe sqe, in BackendRequest request)
        {
            const int file = FirstFixedFile;
            switch (request.Op)
            {
                case IoOp.Read when request.FixedBuffer >= 0:
                    sqe.PrepareReadFixed(file, request.Buffer, (uint)request.Length, (ulong)request.Offset, (ushort)request.FixedBuffer, 0);
                    break;
                case IoOp.Read:
                    sqe.PrepareRead(file, request.Buffer, (uint)request.Length, (ulong)request.Offset, 0);
                    break;
                case IoOp.Write when request.FixedBuffer >= 0:
                    sqe.PrepareWriteFixed(file, request.Buffer, (uint)request.Length, (ulong)request.Offset, (ushort)request.FixedBuffer, 0, request.IsFua ? RwFlags.DSync : RwFlags.None);
                    break;
                case IoOp.Write:
                    sqe.PrepareWrite(file, request.Buffer, (uint)request.Length, (ulong)request.Offset, 0, request.IsFua ? RwFlags.DSync : RwFlags.None);
                    break;
                case IoOp.Flush:
                    sqe.PrepareFsync(file, FsyncFlags.DataSync, 0);
                    break;
                case IoOp.Discard:
                    sqe.PrepareFallocate(file, FallocateMode.PunchHole | FallocateMode.KeepSize, (ulong)request.Offset, (ulong)request.Length, 0);
                    break;
                case IoOp.WriteZeroes:
                    sqe.PrepareFallocate(file, ZeroesMode((request.Flags & IoFlags.NoUnmap) == 0), (ulong)request.Offset, (ulong)request.Length, 0);
                    break;
                default:
                    throw new NotSupportedException($"loop: {request.Op}");
            }
            sqe.flags |= SqeFlags.FixedFile;
        }
    }
}

/// <summary>How a <see cref="LoopTarget"/> does a ublk queue's IO.</summary>
public enum LoopIo
{
    /// <summary>The ring, except on tmpfs and ramfs, where io_uring would punt every request to a worker thread.</summary>
    Auto,

    /// <summary>Always the queue's io_uring.</summary>
    Ring,

    /// <summary>Always pread/pwrite on the queue thread.</summary>
    Sync,
}
