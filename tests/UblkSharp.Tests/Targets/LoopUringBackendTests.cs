using System.Runtime.InteropServices;
using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;
using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.Tests.Targets;

/// <summary>
/// The loop target's io_uring path as a queue uses it: the backend's files registered after a hole
/// at index 0 (the ublk char device in production), one SQE per request prepared by the backend.
/// </summary>
public sealed unsafe class LoopUringBackendTests : IDisposable
{
    private const int MiB = 1 << 20;
    private const int BufferBytes = 4 * MiB;
    private readonly byte* _buffer = (byte*)NativeMemory.AlignedAlloc(BufferBytes, 4096);

    public void Dispose() => NativeMemory.AlignedFree(_buffer);

    private Span<byte> Buffer(int length) => new(_buffer, length);

    /// <summary>A ring with the backend's files registered as a queue registers them.</summary>
    private sealed class Queue : IDisposable
    {
        public Queue(LoopTarget target, int queueId = 0)
        {
            Backend = target.CreateUringBackend(queueId)!;
            Ring = Ring.Create(new RingOptions { Entries = 16, SingleIssuer = true, DeferTaskrun = true });
            int[] files = [-1, .. Backend.Files];
            Ring.RegisterFiles(files);
        }

        public UringBackend Backend { get; }

        public Ring Ring { get; }

        /// <summary>Prepares the request, lets <paramref name="check"/> look at the SQE, submits it and returns the CQE's res.</summary>
        public int Run(in BackendRequest request, SqeCheck? check = null)
        {
            ref var sqe = ref Ring.GetSqe();
            Backend.Prepare(ref sqe, request);
            Assert.True(sqe.flags.HasFlag(SqeFlags.FixedFile));
            Assert.Equal(UringBackend.FirstFixedFile, sqe.fd);
            check?.Invoke(ref sqe);
            sqe.user_data = 0x5eed;
            Assert.Equal(1, Ring.SubmitAndWait(1));
            Assert.True(Ring.TryGetCompletion(out var cqe));
            Assert.Equal(0x5eedul, cqe.user_data);
            return cqe.res;
        }

        public void Dispose()
        {
            Ring.Dispose();
            Backend.Dispose();
        }
    }

    private delegate void SqeCheck(ref Sqe sqe);

    [Fact]
    public void BackendRegistersTheBackingFile()
    {
        using var file = new TempFile(MiB);
        using var target = new LoopTarget(file.Path, io: LoopIo.Ring);
        using var a = target.CreateUringBackend(0)!;
        using var b = target.CreateUringBackend(1)!;
        Assert.NotSame(a, b);
        var fd = Assert.Single(a.Files);
        Assert.Equal(fd, Assert.Single(b.Files));
        Assert.Equal(file.Path, new FileInfo($"/proc/self/fd/{fd}").ResolveLinkTarget(false)?.FullName);
    }

    [Fact]
    public void WriteThenReadRoundTrips()
    {
        using var file = new TempFile(4 * MiB);
        using var target = new LoopTarget(file.Path, io: LoopIo.Ring);
        using var q = new Queue(target);
        var data = LoopTargetTests.Pattern(256 * 1024, 10);
        data.CopyTo(Buffer(data.Length));

        Assert.Equal(data.Length, q.Run(new BackendRequest(IoOp.Write, IoFlags.None, MiB + 4096, data.Length, _buffer), (ref Sqe s) =>
        {
            Assert.Equal(Opcode.Write, s.opcode);
            Assert.Equal((uint)RwFlags.None, s.op_flags);
            Assert.Equal((ulong)(MiB + 4096), s.off);
            Assert.Equal((uint)data.Length, s.len);
        }));
        Assert.Equal(data, LoopTargetTests.Slice(file.Path, MiB + 4096, data.Length));

        Buffer(data.Length).Clear();
        Assert.Equal(data.Length, q.Run(new BackendRequest(IoOp.Read, IoFlags.None, MiB + 4096, data.Length, _buffer), (ref Sqe s) => Assert.Equal(Opcode.Read, s.opcode)));
        Assert.True(Buffer(data.Length).SequenceEqual(data));
    }

    [Fact]
    public void TheRemainderOfAShortRequestGoesToTheRightPlace()
    {
        // What the runtime submits after a short completion: the same request narrowed by what was done.
        using var file = new TempFile(MiB);
        using var target = new LoopTarget(file.Path, io: LoopIo.Ring);
        using var q = new Queue(target);
        var data = LoopTargetTests.Pattern(64 * 1024, 11);
        data.CopyTo(Buffer(data.Length));
        const int done = 12 * 1024;
        Assert.Equal(done, q.Run(new BackendRequest(IoOp.Write, IoFlags.None, 8192, done, _buffer)));
        Assert.Equal(data.Length - done, q.Run(new BackendRequest(IoOp.Write, IoFlags.None, 8192 + done, data.Length - done, _buffer + done)));
        Assert.Equal(data, LoopTargetTests.Slice(file.Path, 8192, data.Length));
    }

    [Fact]
    public void FuaWriteIsADsyncWrite()
    {
        using var file = new TempFile(MiB);
        using var target = new LoopTarget(file.Path, io: LoopIo.Ring);
        using var q = new Queue(target);
        var data = LoopTargetTests.Pattern(8192, 12);
        data.CopyTo(Buffer(data.Length));
        Assert.Equal(8192, q.Run(new BackendRequest(IoOp.Write, IoFlags.Fua, 4096, 8192, _buffer), (ref Sqe s) =>
        {
            Assert.Equal(Opcode.Write, s.opcode);
            Assert.Equal((uint)RwFlags.DSync, s.op_flags);
        }));
        Assert.Equal(data, LoopTargetTests.Slice(file.Path, 4096, 8192));
    }

    [Fact]
    public void FlushIsFdatasync()
    {
        using var file = new TempFile(MiB);
        using var target = new LoopTarget(file.Path, io: LoopIo.Ring);
        using var q = new Queue(target);
        Assert.Equal(0, q.Run(new BackendRequest(IoOp.Flush, IoFlags.None, 0, 0, null), (ref Sqe s) =>
        {
            Assert.Equal(Opcode.Fsync, s.opcode);
            Assert.Equal((uint)FsyncFlags.DataSync, s.op_flags);
        }));
    }

    [Fact]
    public void DiscardPunchesAHole()
    {
        var data = LoopTargetTests.Pattern(4 * MiB, 13);
        using var file = LoopTargetTests.FileWith(data);
        using var target = new LoopTarget(file.Path, io: LoopIo.Ring);
        using var q = new Queue(target);
        var before = FileStat.AllocatedBytes(file.Path);

        Assert.Equal(0, q.Run(new BackendRequest(IoOp.Discard, IoFlags.None, MiB, 2 * MiB, null), (ref Sqe s) =>
        {
            Assert.Equal(Opcode.Fallocate, s.opcode);
            Assert.Equal((uint)(FallocateMode.PunchHole | FallocateMode.KeepSize), s.len); // liburing puts the mode in len
            Assert.Equal((ulong)(2 * MiB), s.addr);
            Assert.Equal((ulong)MiB, s.off);
        }));

        var after = FileStat.AllocatedBytes(file.Path);
        Assert.True(after <= before - (2 * MiB), $"{before} -> {after} bytes allocated");
        Assert.Equal(4 * MiB, FileStat.Size(file.Path));
        var expected = (byte[])data.Clone();
        Array.Clear(expected, MiB, 2 * MiB);
        Assert.Equal(expected, File.ReadAllBytes(file.Path));
    }

    [Theory]
    [InlineData(IoFlags.None)]
    [InlineData(IoFlags.NoUnmap)]
    public void WriteZeroesUnmapsUnlessNoUnmap(IoFlags flags)
    {
        var data = LoopTargetTests.Pattern(4 * MiB, 14);
        using var file = LoopTargetTests.FileWith(data);
        using var target = new LoopTarget(file.Path, io: LoopIo.Ring);
        using var q = new Queue(target);
        var before = FileStat.AllocatedBytes(file.Path);
        var noUnmap = flags == IoFlags.NoUnmap;

        Assert.Equal(0, q.Run(new BackendRequest(IoOp.WriteZeroes, flags, 512 * 1024, 3 * MiB, null), (ref Sqe s) =>
        {
            Assert.Equal(Opcode.Fallocate, s.opcode);
            var mode = noUnmap ? FallocateMode.ZeroRange | FallocateMode.KeepSize : FallocateMode.PunchHole | FallocateMode.KeepSize;
            Assert.Equal((uint)mode, s.len);
        }));

        var after = FileStat.AllocatedBytes(file.Path);
        if (noUnmap)
        {
            Assert.True(after >= before, $"{before} -> {after} bytes allocated: NOUNMAP must keep the range allocated");
        }
        else
        {
            Assert.True(after <= before - (3 * MiB), $"{before} -> {after} bytes allocated");
        }
        var expected = (byte[])data.Clone();
        Array.Clear(expected, 512 * 1024, 3 * MiB);
        Assert.Equal(expected, File.ReadAllBytes(file.Path));
    }

    [Theory]
    [InlineData(IoOp.WriteSame)]
    [InlineData(IoOp.ZoneAppend)]
    [InlineData(IoOp.ReportZones)]
    public void OtherOpsAreRefusedWhilePreparing(IoOp op)
    {
        using var file = new TempFile(MiB);
        using var target = new LoopTarget(file.Path, io: LoopIo.Ring);
        using var backend = target.CreateUringBackend(0)!;
        var sqe = default(Sqe);
        var e = Assert.Throws<NotSupportedException>(() => backend.Prepare(ref sqe, new BackendRequest(op, IoFlags.None, 0, 4096, _buffer)));
        Assert.Contains(op.ToString(), e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void ReadOnlyBackendCannotWriteTheFile()
    {
        var data = LoopTargetTests.Pattern(MiB, 15);
        using var file = LoopTargetTests.FileWith(data);
        using var target = new LoopTarget(file.Path, readOnly: true);
        using var q = new Queue(target);
        Buffer(4096).Clear();
        Assert.Equal(-Errno.EBADF, q.Run(new BackendRequest(IoOp.Write, IoFlags.None, 0, 4096, _buffer)));
        Assert.Equal(4096, q.Run(new BackendRequest(IoOp.Read, IoFlags.None, 0, 4096, _buffer)));
        Assert.True(Buffer(4096).SequenceEqual(data.AsSpan(0, 4096)));
        Assert.Equal(data, File.ReadAllBytes(file.Path));
    }

    /// <summary>
    /// --direct-io really bypasses the page cache: after a write and a read through the target, none
    /// of the file's pages are cached. /var/tmp is on disk (FHS: it survives reboots), never tmpfs,
    /// whose O_DIRECT (6.6+) goes through the page cache. A file system that refuses O_DIRECT is
    /// DirectIoOnAFileSystemWithoutItIsAClearError's case.
    /// </summary>
    [Fact]
    public void DirectIoBypassesThePageCache()
    {
        using var file = new TempFile(MiB, "/var/tmp");
        var probe = Libc.open(file.Path, Libc.O_RDWR | Libc.O_DIRECT | Libc.O_CLOEXEC, 0);
        Assert.True(probe >= 0, $"/var/tmp refuses O_DIRECT (errno {Marshal.GetLastPInvokeError()}): this test needs a disk file system there");
        _ = Libc.close(probe);

        using var target = (LoopTarget)TargetFactory.Create("loop", new Dictionary<string, string> { ["file"] = file.Path, ["direct-io"] = "on" });
        Assert.True(target.DirectIo);
        Assert.Equal("on", target.Recipe["direct-io"]);
        using var q = new Queue(target);
        var data = LoopTargetTests.Pattern(64 * 1024, 16);
        data.CopyTo(Buffer(data.Length));
        Assert.Equal(data.Length, q.Run(new BackendRequest(IoOp.Write, IoFlags.Fua, 4096, data.Length, _buffer)));
        Buffer(data.Length).Clear();
        Assert.Equal(data.Length, q.Run(new BackendRequest(IoOp.Read, IoFlags.None, 4096, data.Length, _buffer)));
        Assert.True(Buffer(data.Length).SequenceEqual(data));

        // The synchronous path is direct too, given aligned memory.
        Assert.Equal(4096, target.Read(Buffer(4096), 4096));
        Assert.True(Buffer(4096).SequenceEqual(data.AsSpan(0, 4096)));

        // Buffered IO would have left these pages cached (dirty after the write, clean after the read).
        Assert.Equal(0, PageCache.ResidentPages(file.Path, 4096, data.Length));

        // O_DIRECT is really on: a buffer that is not sector-aligned is refused, as the page cache never would.
        Assert.Equal(-Errno.EINVAL, q.Run(new BackendRequest(IoOp.Read, IoFlags.None, 4096, 4096, _buffer + 1)));

        // The data is in the file (read buffered, last, as it fills the cache).
        Assert.Equal(data, LoopTargetTests.Slice(file.Path, 4096, data.Length));
    }

    [Fact]
    public void DirectIoOnAFileSystemWithoutItIsAClearError()
    {
        // procfs refuses O_DIRECT (EINVAL) on every kernel, where tmpfs accepts it since Linux 6.6.
        AssertDirectIoRefusedClearly("/proc/version", readOnly: true);
    }

    private static void AssertDirectIoRefusedClearly(string path, bool readOnly)
    {
        var options = new Dictionary<string, string> { ["file"] = path, ["direct-io"] = "on" };
        if (readOnly)
        {
            options["read-only"] = "on";
        }
        var e = Assert.Throws<ArgumentException>(() => TargetFactory.Create("loop", options).Dispose());
        Assert.Equal($"{path}: cannot open it with --direct-io: its file system does not support O_DIRECT", e.Message);
    }
}
