using System.Net.Sockets;
using System.Runtime.InteropServices;
using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;

namespace UblkSharp.Tests.IoUring;

/// <summary>The binding on the host's real io_uring.</summary>
public unsafe class RingTests
{
    [Fact]
    public void NopCompletesWithItsUserData()
    {
        using var ring = Ring.Create(new RingOptions { Entries = 8 });
        ring.GetSqe().PrepareNop(0xfeedface12345678);
        Assert.Equal(1, ring.SubmitAndWait(1));
        Assert.True(ring.TryGetCompletion(out var cqe));
        Assert.Equal(0xfeedface12345678ul, cqe.user_data);
        Assert.Equal(0, cqe.res);
        Assert.False(ring.TryGetCompletion(out _));
    }

    [Fact]
    public void QueueSetupGetsTheFastFlagsOnThisKernel()
    {
        using var ring = Ring.Create(new RingOptions { Entries = 128, CompletionEntries = 256, SingleIssuer = true, CoopTaskrun = true, DeferTaskrun = true });
        Assert.True(ring.Flags.HasFlag(SetupFlags.SingleIssuer));
        Assert.True(ring.Flags.HasFlag(SetupFlags.DeferTaskrun));
        Assert.True(ring.Flags.HasFlag(SetupFlags.CqSize));
        Assert.Equal(128u, ring.SqEntries);
        Assert.Equal(256u, ring.CqEntries);
        Assert.True(ring.Features.HasFlag(RingFeatures.ExtArg));
        // DEFER_TASKRUN completions appear only on GETEVENTS; the binding must ask for them.
        ring.GetSqe().PrepareNop(7);
        ring.SubmitAndWait(1);
        Assert.True(ring.TryGetCompletion(out var cqe));
        Assert.Equal(7ul, cqe.user_data);
    }

    [Fact]
    public void Sqe128AndCqe32RingsWork()
    {
        using var ring = Ring.Create(new RingOptions { Entries = 4, Sqe128 = true, Cqe32 = true });
        Assert.Equal(80, ring.CmdCapacity);
        Assert.True(ring.Flags.HasFlag(SetupFlags.Sqe128 | SetupFlags.Cqe32));
        for (ulong i = 0; i < 10; i++)
        {
            ring.GetSqe().PrepareNop(i);
            ring.SubmitAndWait(1);
            Assert.Equal(16, ring.PeekBigCqeExtra().Length);
            Assert.True(ring.TryGetCompletion(out var cqe));
            Assert.Equal(i, cqe.user_data);
        }
    }

    [Fact]
    public void InvalidSetupNamesTheErrno()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => Ring.Create(new RingOptions { Entries = 0 }));
        var e = Assert.Throws<ErrnoException>(() => Ring.Create(new RingOptions { Entries = 1u << 20 }));
        Assert.Equal(Errno.EINVAL, e.Errno);
        Assert.Contains("io_uring_setup failed: EINVAL (22)", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void ReadOnBadFdCompletesWithEbadf()
    {
        using var ring = Ring.Create(new RingOptions { Entries = 4 });
        var buf = stackalloc byte[16];
        ring.GetSqe().PrepareRead(12345, buf, 16, 0, 1);
        ring.GetSqe().PrepareWrite(12346, buf, 16, 0, 2);
        ring.SubmitAndWait(2);
        Assert.True(ring.TryGetCompletion(out var a));
        Assert.True(ring.TryGetCompletion(out var b));
        Assert.Equal(-Errno.EBADF, a.res);
        Assert.Equal(-Errno.EBADF, b.res);
        Assert.StartsWith("EBADF (9)", Errno.Describe(a.res), StringComparison.Ordinal);
    }

    [Fact]
    public void FileRoundTripWithThousandsInFlight()
    {
        const int ops = 4096, block = 4096;
        using var file = new TempFile();
        using var ring = Ring.Create(new RingOptions { Entries = ops, CompletionEntries = ops * 2 });
        var data = (byte*)NativeMemory.AlignedAlloc(ops * block, 4096);
        var back = (byte*)NativeMemory.AlignedAlloc(ops * block, 4096);
        try
        {
            var rnd = new Random(42);
            rnd.NextBytes(new Span<byte>(data, ops * block));

            // Every write in flight at once, in reverse order, so completion order differs from submission order.
            for (var i = ops - 1; i >= 0; i--)
            {
                ring.GetSqe().PrepareWrite(file.Fd, data + ((long)i * block), block, (ulong)i * block, (ulong)i);
            }
            Assert.Equal(ops, ring.SubmitAndWait(ops));
            Assert.Equal(ops, ReapAll(ring, ops, block));

            ring.GetSqe().PrepareFsync(file.Fd, FsyncFlags.DataSync, 99);
            ring.SubmitAndWait(1);
            Assert.True(ring.TryGetCompletion(out var fsync));
            Assert.Equal(0, fsync.res);

            // Read back half with READ and half with READV.
            var iovs = (Iovec*)NativeMemory.Alloc((nuint)(ops * sizeof(Iovec)));
            for (var i = 0; i < ops; i++)
            {
                if (i % 2 == 0)
                {
                    ring.GetSqe().PrepareRead(file.Fd, back + ((long)i * block), block, (ulong)i * block, (ulong)i);
                }
                else
                {
                    iovs[i] = new Iovec { iov_base = back + ((long)i * block), iov_len = block };
                    ring.GetSqe().PrepareReadv(file.Fd, &iovs[i], 1, (ulong)i * block, (ulong)i);
                }
            }
            ring.SubmitAndWait(ops);
            Assert.Equal(ops, ReapAll(ring, ops, block));
            NativeMemory.Free(iovs);
            Assert.True(new Span<byte>(data, ops * block).SequenceEqual(new Span<byte>(back, ops * block)));
            Assert.Equal(ops * block, new FileInfo(file.Path).Length);
        }
        finally
        {
            NativeMemory.AlignedFree(data);
            NativeMemory.AlignedFree(back);
        }
    }

    private static int ReapAll(Ring ring, int expected, int block)
    {
        var seen = new bool[expected];
        var n = 0;
        while (n < expected)
        {
            if (!ring.TryGetCompletion(out var cqe))
            {
                ring.SubmitAndWait(1);
                continue;
            }
            Assert.Equal(block, cqe.res);
            Assert.False(seen[cqe.user_data]);
            seen[cqe.user_data] = true;
            n++;
        }
        return n;
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)] // PeekCompletions/CompletionAt/AdvanceCompletions: read in place, one head release per batch
    public void CqOverflowLosesNoCompletion(bool inPlace)
    {
        // 16 SQ / 32 CQ entries, 1000 NOPs submitted without reaping: the CQ overflows many times over.
        using var ring = Ring.Create(new RingOptions { Entries = 16, CompletionEntries = 32 });
        Assert.True(ring.Features.HasFlag(RingFeatures.NoDrop));
        const int total = 1000;
        var submitted = 0;
        var sawBacklog = false;
        var seen = new HashSet<ulong>();
        while (submitted < total)
        {
            while (submitted < total && ring.TryGetSqe(out var sqe))
            {
                sqe->PrepareNop((ulong)submitted++);
            }
            var taken = ring.Submit();
            sawBacklog |= ring.HasOverflowBacklog;
            if (taken == 0 && ring.SqSpace == 0)
            {
                break; // the kernel pushes back; reap below
            }
        }
        Assert.True(sawBacklog, "the test never overflowed the CQ");
        while (true)
        {
            if (inPlace)
            {
                for (var n = ring.PeekCompletions(); n > 0; n = ring.PeekCompletions())
                {
                    for (var i = 0u; i < n; i++)
                    {
                        Assert.True(seen.Add(ring.CompletionAt(i).user_data));
                    }
                    ring.AdvanceCompletions(n);
                }
            }
            else
            {
                while (ring.TryGetCompletion(out var cqe))
                {
                    Assert.True(seen.Add(cqe.user_data));
                }
            }
            if (seen.Count == submitted && ring.Pending == 0)
            {
                if (submitted == total)
                {
                    break;
                }
                while (submitted < total && ring.TryGetSqe(out var sqe))
                {
                    sqe->PrepareNop((ulong)submitted++);
                }
            }
            ring.SubmitAndWait(1, TimeSpan.FromSeconds(5));
        }
        Assert.Equal(total, seen.Count);
        Assert.Equal(0u, ring.CqOverflowCount);
    }

    [Fact]
    public void WaitWithTimeoutReturnsWithoutCompletions()
    {
        using var ring = Ring.Create(new RingOptions { Entries = 4 });
        var start = Environment.TickCount64;
        ring.SubmitAndWait(1, TimeSpan.FromMilliseconds(50));
        var elapsed = Environment.TickCount64 - start;
        Assert.Equal(0u, ring.CqReady);
        Assert.InRange(elapsed, 40, 5000);
    }

    [Fact]
    public void TimeoutOpExpiresAndCancelStopsAnother()
    {
        using var ring = Ring.Create(new RingOptions { Entries = 8 });
        var shortTs = KernelTimespec.From(TimeSpan.FromMilliseconds(10));
        var longTs = KernelTimespec.From(TimeSpan.FromSeconds(60));
        ring.GetSqe().PrepareTimeout(&shortTs, 0, TimeoutFlags.None, 1);
        ring.GetSqe().PrepareTimeout(&longTs, 0, TimeoutFlags.None, 2);
        ring.Submit();
        ring.SubmitAndWait(1);
        Assert.True(ring.TryGetCompletion(out var expired));
        Assert.Equal(1ul, expired.user_data);
        Assert.Equal(-Errno.ETIME, expired.res);

        ring.GetSqe().PrepareCancel(2, CancelFlags.None, 3);
        ring.SubmitAndWait(2);
        var results = new Dictionary<ulong, int>();
        while (results.Count < 2)
        {
            if (ring.TryGetCompletion(out var c))
            {
                results[c.user_data] = c.res;
            }
            else
            {
                ring.SubmitAndWait(1, TimeSpan.FromSeconds(5));
            }
        }
        Assert.Equal(-Errno.ECANCELED, results[2]);
        Assert.Equal(0, results[3]);
    }

    [Fact]
    public void FallocatePunchesAndZeroesRanges()
    {
        using var file = new TempFile();
        var data = new byte[1 << 20];
        Array.Fill(data, (byte)0xab);
        File.WriteAllBytes(file.Path, data);
        using var ring = Ring.Create(new RingOptions { Entries = 4 });
        ring.GetSqe().PrepareFallocate(file.Fd, FallocateMode.PunchHole | FallocateMode.KeepSize, 65536, 131072, 1);
        ring.GetSqe().PrepareFallocate(file.Fd, FallocateMode.ZeroRange, 524288, 4096, 2);
        ring.SubmitAndWait(2);
        for (var i = 0; i < 2; i++)
        {
            Assert.True(ring.TryGetCompletion(out var cqe));
            Assert.Equal(0, cqe.res);
        }
        var back = File.ReadAllBytes(file.Path);
        Assert.Equal(data.Length, back.Length);
        Assert.All(back.AsSpan(65536, 131072).ToArray(), b => Assert.Equal(0, b));
        Assert.All(back.AsSpan(524288, 4096).ToArray(), b => Assert.Equal(0, b));
        Assert.Equal(0xab, back[65535]);
        Assert.Equal(0xab, back[65536 + 131072]);
        Assert.Equal(0xab, back[524288 + 4096]);
    }

    [Fact]
    public void WritevAndDsyncWrite()
    {
        using var file = new TempFile();
        using var ring = Ring.Create(new RingOptions { Entries = 4 });
        var a = stackalloc byte[3] { 1, 2, 3 };
        var b = stackalloc byte[2] { 4, 5 };
        var iov = stackalloc Iovec[2] { new() { iov_base = a, iov_len = 3 }, new() { iov_base = b, iov_len = 2 } };
        ring.GetSqe().PrepareWritev(file.Fd, iov, 2, 0, 1);
        ring.SubmitAndWait(1);
        Assert.True(ring.TryGetCompletion(out var c1));
        Assert.Equal(5, c1.res);
        ring.GetSqe().PrepareWrite(file.Fd, a, 3, 5, 2, RwFlags.DSync);
        ring.SubmitAndWait(1);
        Assert.True(ring.TryGetCompletion(out var c2));
        Assert.Equal(3, c2.res);
        Assert.Equal(new byte[] { 1, 2, 3, 4, 5, 1, 2, 3 }, File.ReadAllBytes(file.Path));
    }

    [Fact]
    public void SparseBufferTableSlotsAreEmptyUntilABufferIsInstalled()
    {
        // ublk's zero copy: the driver installs a request's pages in a slot of a sparse table; here a
        // user buffer stands in for them (IORING_REGISTER_BUFFERS_UPDATE).
        using var file = new TempFile();
        File.WriteAllBytes(file.Path, [.. Enumerable.Range(0, 8192).Select(i => (byte)(i * 7))]);
        using var ring = Ring.Create(new RingOptions { Entries = 4 });
        var buf = (byte*)NativeMemory.AlignedAlloc(8192, 4096);
        try
        {
            ring.RegisterFiles([file.Fd]);
            ring.RegisterSparseBuffers(64);

            ref var sqe = ref ring.GetSqe();
            sqe.PrepareReadFixed(0, buf, 4096, 0, 5, 1);
            sqe.flags |= SqeFlags.FixedFile;
            ring.SubmitAndWait(1);
            Assert.True(ring.TryGetCompletion(out var empty));
            Assert.True(empty.res < 0, $"READ_FIXED on an empty slot gave {empty.res}");

            var iov = new Iovec { iov_base = buf, iov_len = 8192 };
            ring.UpdateBuffers(5, new ReadOnlySpan<Iovec>(&iov, 1));
            sqe = ref ring.GetSqe();
            sqe.PrepareReadFixed(0, buf + 4096, 4096, 4096, 5, 2);
            sqe.flags |= SqeFlags.FixedFile;
            ring.SubmitAndWait(1);
            Assert.True(ring.TryGetCompletion(out var read));
            Assert.Equal(4096, read.res);
            Assert.Equal(unchecked((byte)(4100 * 7)), buf[4096 + 4]);

            buf[4096] = 0xee;
            sqe = ref ring.GetSqe();
            sqe.PrepareWriteFixed(0, buf + 4096, 1, 0, 5, 3, RwFlags.DSync);
            sqe.flags |= SqeFlags.FixedFile;
            ring.SubmitAndWait(1);
            Assert.True(ring.TryGetCompletion(out var write));
            Assert.Equal(1, write.res);
            Assert.Equal(0xee, File.ReadAllBytes(file.Path)[0]);
        }
        finally
        {
            NativeMemory.AlignedFree(buf);
        }
    }

    [Fact]
    public void IncrementalBufferRingHandsOutOneBufferAPieceAtATime()
    {
        // What ublk's batched fetch (FETCH_IO_CMDS) uses: the kernel appends each completion's bytes
        // to the same provided buffer, the CQE naming the buffer and saying whether room is left.
        Span<int> fds = stackalloc int[2];
        fixed (int* p = fds)
        {
            Assert.Equal(0, Libc.socketpair(Libc.AF_UNIX, Libc.SOCK_STREAM | Libc.SOCK_CLOEXEC, 0, p));
        }
        using var ring = Ring.Create(new RingOptions { Entries = 4 });
        var buf = (byte*)NativeMemory.AlignedAlloc(4096, 4096);
        try
        {
            using var br = BufferRing.Register(ring, 7, 8, incremental: true);
            br.Add(buf, 4096, 3);
            br.Advance(1);
            var sent = 0;
            var data = stackalloc byte[100];
            foreach (var n in new[] { 100, 50 })
            {
                for (var i = 0; i < n; i++)
                {
                    data[i] = (byte)(sent + i);
                }
                Assert.Equal(n, (int)Libc.write(fds[1], data, (nuint)n));
                var cqe = ReceiveSelected(ring, fds[0], 7);
                Assert.Equal(n, cqe.res);
                Assert.True((cqe.flags & CqeFlags.Buffer) != 0, $"no buffer in the CQE's flags {cqe.flags:x}");
                Assert.Equal(3u, cqe.flags >> CqeFlags.BufferShift);
                Assert.True((cqe.flags & CqeFlags.BufMore) != 0, $"the buffer should have room left (flags {cqe.flags:x})");
                sent += n;
            }
            // The second receive continued where the first ended, in the same buffer.
            for (var i = 0; i < sent; i++)
            {
                Assert.Equal((byte)i, buf[i]);
            }

            // Reset forgets what was used of the buffer: the next receive starts a fresh one.
            br.Reset();
            br.Add(buf + 2048, 2048, 4);
            br.Advance(1);
            data[0] = 0xab;
            Assert.Equal(1, (int)Libc.write(fds[1], data, 1));
            var last = ReceiveSelected(ring, fds[0], 7);
            Assert.Equal(1, last.res);
            Assert.Equal(4u, last.flags >> CqeFlags.BufferShift);
            Assert.Equal(0xab, buf[2048]);
        }
        finally
        {
            NativeMemory.AlignedFree(buf);
            _ = Libc.close(fds[0]);
            _ = Libc.close(fds[1]);
        }
    }

    /// <summary>One RECV into a buffer the kernel picks from <paramref name="group"/>; its completion.</summary>
    private static Cqe ReceiveSelected(Ring ring, int fd, ushort group)
    {
        ref var sqe = ref ring.GetSqe();
        sqe.PrepareRecv(fd, null, 0, MsgFlags.None, 1);
        sqe.flags |= SqeFlags.BufferSelect;
        sqe.buf_group = group;
        ring.SubmitAndWait(1);
        Assert.True(ring.TryGetCompletion(out var cqe));
        return cqe;
    }

    [Fact]
    public void RegisteredFilesBuffersAndEventFd()
    {
        using var file = new TempFile();
        File.WriteAllBytes(file.Path, [.. Enumerable.Range(0, 8192).Select(i => (byte)i)]);
        using var ring = Ring.Create(new RingOptions { Entries = 4 });
        var buf = (byte*)NativeMemory.AlignedAlloc(8192, 4096);
        var efd = Libc.eventfd(0, Libc.EFD_CLOEXEC | Libc.EFD_NONBLOCK);
        Assert.True(efd >= 0);
        try
        {
            ring.RegisterFiles([-1, file.Fd]);
            var iov = new Iovec { iov_base = buf, iov_len = 8192 };
            ring.RegisterBuffers(new ReadOnlySpan<Iovec>(&iov, 1));
            ring.RegisterEventFd(efd);

            ref var sqe = ref ring.GetSqe();
            sqe.PrepareReadFixed(1, buf, 4096, 4096, 0, 1);
            sqe.flags |= SqeFlags.FixedFile;
            ring.SubmitAndWait(1);
            Assert.True(ring.TryGetCompletion(out var cqe));
            Assert.Equal(4096, cqe.res);
            Assert.Equal(0, buf[0]); // byte 4096 of the file holds (byte)4096 == 0
            Assert.Equal(unchecked((byte)(4096 + 4095)), buf[4095]);

            ulong count = 0;
            Assert.Equal(8, (int)Libc.read(efd, &count, 8));
            Assert.Equal(1ul, count);

            // Swap the file out of slot 1: the fixed read now fails with EBADF.
            ring.UpdateFiles(1, [-1]);
            sqe = ref ring.GetSqe();
            sqe.PrepareRead(1, buf, 16, 0, 2);
            sqe.flags |= SqeFlags.FixedFile;
            ring.SubmitAndWait(1);
            Assert.True(ring.TryGetCompletion(out cqe));
            Assert.Equal(-Errno.EBADF, cqe.res);

            ring.UnregisterEventFd();
            ring.UnregisterBuffers();
            ring.UnregisterFiles();
        }
        finally
        {
            _ = Libc.close(efd);
            NativeMemory.AlignedFree(buf);
        }
    }

    // SOCKET_URING_OP_SIOCINQ (6.7+): the kernel answers a URING_CMD on a socket with the bytes queued.
    [Fact]
    public void UringCmdReachesTheFilesHandler()
    {
        // TCP on loopback: unix sockets have no proto ioctl, so they answer EOPNOTSUPP.
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new System.Net.IPEndPoint(System.Net.IPAddress.Loopback, 0));
        listener.Listen(1);
        using var a = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        a.Connect(listener.LocalEndPoint!);
        using var b = listener.Accept();
        a.Send(new byte[5]);
        while (b.Available < 5)
        {
            Thread.Sleep(1);
        }

        foreach (var sqe128 in new[] { false, true })
        {
            using var ring = Ring.Create(new RingOptions { Entries = 4, Sqe128 = sqe128 });
            ring.PrepareUringCmd((int)b.Handle, 0 /* SIOCINQ */, new Payload16(), 1);
            ring.SubmitAndWait(1);
            Assert.True(ring.TryGetCompletion(out var cqe));
            Assert.Equal(5, cqe.res);
        }
    }

    [Fact]
    public void UringCmdPayloadLandsInTheCommandArea()
    {
        using var ring = Ring.Create(new RingOptions { Entries = 4, Sqe128 = true });
        Payload80 p = default;
        var bytes = new Span<byte>(&p, 80);
        for (var i = 0; i < 80; i++)
        {
            bytes[i] = (byte)(i + 1);
        }
        ref var sqe = ref ring.PrepareUringCmd(3, 0xc0207504, p, 9);
        fixed (Sqe* s = &sqe)
        {
            var raw = new ReadOnlySpan<byte>(s, 128);
            Assert.Equal((byte)Opcode.UringCmd, raw[0]);
            Assert.Equal(0xc0207504u, BitConverter.ToUInt32(raw[8..12]));
            Assert.True(raw.Slice(Sqe.CmdOffset, 80).SequenceEqual(bytes));
        }
        using var small = Ring.Create(new RingOptions { Entries = 4 });
        Assert.Equal(16, small.CmdCapacity);
        var copy = p;
        Assert.Throws<ArgumentException>(() => small.PrepareUringCmd(3, 1, copy, 1));
    }

    [Fact]
    public void DisposedRingRefusesWork()
    {
        var ring = Ring.Create(new RingOptions { Entries = 4 });
        ring.Dispose();
        ring.Dispose();
        Assert.Equal(-1, ring.Fd);
        Assert.Throws<ObjectDisposedException>(() => ring.Submit());
    }

    [StructLayout(LayoutKind.Sequential, Size = 16)]
    private struct Payload16;

    [StructLayout(LayoutKind.Sequential, Size = 80)]
    private struct Payload80;
}
