using Microsoft.Win32.SafeHandles;
using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;
using UblkSharp.Ublk;

namespace UblkSharp.Targets;

/// <summary>
/// A file or block device as a disk, like the kernel's loop driver. IO goes on each queue's own
/// io_uring with the backing file registered as a fixed file: flush is fdatasync, discard punches
/// a hole, write-zeroes is FALLOC_FL_ZERO_RANGE and FUA is a RWF_DSYNC write.
/// </summary>
public sealed unsafe class LoopTarget : BlockTarget
{
    private const ulong BLKGETSIZE64 = 0x80081272;
    private readonly int _fd;
    private readonly SafeFileHandle _handle;
    private readonly bool _readOnly;

    public LoopTarget(string path, bool directIo = false, bool readOnly = false)
    {
        ArgumentNullException.ThrowIfNull(path);
        Path = path;
        DirectIo = directIo;
        _readOnly = readOnly;
        if (Directory.Exists(path))
        {
            throw new ArgumentException($"{path} is a directory, not a file or block device");
        }
        var flags = (readOnly ? Libc.O_RDONLY : Libc.O_RDWR) | (directIo ? Libc.O_DIRECT : 0);
        _fd = Libc.OpenOrThrow(path, flags);
        _handle = new SafeFileHandle(_fd, ownsHandle: true);
        ulong bytes = 0;
        if (Libc.ioctl(_fd, BLKGETSIZE64, &bytes) == 0)
        {
            IsBlockDevice = true;
        }
        else
        {
            bytes = (ulong)RandomAccess.GetLength(_handle);
        }
        // Like the loop driver, a tail shorter than a sector is not part of the device.
        Size = (long)bytes & ~511L;
        if (Size == 0)
        {
            _handle.Dispose();
            throw new ArgumentException($"{path} is {bytes} bytes: a loop device needs at least 512");
        }
    }

    public string Path { get; }

    public bool DirectIo { get; }

    public bool IsBlockDevice { get; }

    public override long Size { get; }

    public override string Kind => "loop";

    public override IReadOnlyDictionary<string, string> Recipe => new Dictionary<string, string>
    {
        ["file"] = Path,
        ["direct-io"] = DirectIo ? "on" : "off",
        ["read-only"] = _readOnly ? "on" : "off",
    };

    public override bool IsReadOnly => _readOnly;

    public override bool HasVolatileCache => true;

    public override bool SurvivesRestart => true;

    public override bool HasNativeFua => true;

    public override bool CanDiscard => !_readOnly;

    public override bool CanWriteZeroes => !_readOnly;

    // The synchronous path serves callers outside a ublk queue (e.g. an NBD export); ublk queues use the ring.
    public override int Read(Span<byte> buffer, long offset)
    {
        try
        {
            return RandomAccess.Read(_handle, buffer, offset);
        }
        catch (IOException)
        {
            return -Errno.EIO;
        }
    }

    public override int Write(ReadOnlySpan<byte> data, long offset)
    {
        if (_readOnly)
        {
            // The fd is O_RDONLY: .NET would throw UnauthorizedAccessException (EBADF), not return an errno.
            return -Errno.EROFS;
        }
        try
        {
            RandomAccess.Write(_handle, data, offset);
            return data.Length;
        }
        catch (IOException)
        {
            return -Errno.EIO;
        }
    }

    public override int Flush()
    {
        try
        {
            RandomAccess.FlushToDisk(_handle);
            return 0;
        }
        catch (IOException)
        {
            return -Errno.EIO;
        }
    }

    public override int Discard(long offset, long length)
        => _readOnly ? -Errno.EROFS : Fallocate(FallocateMode.PunchHole | FallocateMode.KeepSize, offset, length);

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
        => Libc.fallocate(_fd, (int)mode, offset, length) == 0 ? 0 : -System.Runtime.InteropServices.Marshal.GetLastPInvokeError();

    public override UringBackend CreateUringBackend(int queueId) => new Backend(_fd);

    protected override void Dispose(bool disposing)
    {
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
                case IoOp.Read:
                    sqe.PrepareRead(file, request.Buffer, (uint)request.Length, (ulong)request.Offset, 0);
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
