using System.Diagnostics;
using System.Runtime.InteropServices;
using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;
using UblkSharp.Nbd;
using UblkSharp.Nbd.Protocol;
using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.Tests.Nbd;

/// <summary>
/// The nbd target's ring backend on a real io_uring on the host, driven as a queue drives it:
/// requests started through <see cref="UringBackend.Start"/>, every completion handed to
/// <see cref="UringBackend.OnStep"/>, results taken through <see cref="IBackendRing.Complete"/>,
/// and at the end <see cref="UringBackend.OnQueueEnding"/>, after which every SQE must come back.
/// </summary>
internal sealed unsafe class NbdStepRing : IBackendRing, IDisposable
{
    private readonly Ring _ring = Ring.Create(new RingOptions { Entries = 256, CompletionEntries = 1024, SingleIssuer = true, DeferTaskrun = true });

    public NbdStepRing(UringBackend backend) => Backend = backend;

    public UringBackend Backend { get; }

    public Dictionary<int, int> Results { get; } = [];

    public int InFlight { get; private set; }

    public ref Sqe GetSqe(int tag, uint stepId, out ulong userData)
    {
        userData = (uint)tag | ((ulong)stepId << 32);
        InFlight++;
        return ref _ring.GetSqe();
    }

    public void Complete(int tag, int result)
    {
        // The message only on failure: allocation tests count what this does per request.
        if (Results.ContainsKey(tag))
        {
            Assert.Fail($"tag {tag} completed twice");
        }
        Results[tag] = result;
    }

    /// <summary>Starts a request; false if it ended at once (its result is in <see cref="Results"/>).</summary>
    public bool Start(int tag, in BackendRequest request)
    {
        Results.Remove(tag);
        var r = Backend.Start(this, tag, request);
        if (r != UringBackend.Pending)
        {
            Complete(tag, r);
            return false;
        }
        return true;
    }

    public void Pump(TimeSpan wait)
    {
        _ring.SubmitAndWait(1, wait);
        while (_ring.TryGetCompletion(out var cqe))
        {
            InFlight--;
            Backend.OnStep(this, (int)(cqe.user_data & 0xffff), (uint)(cqe.user_data >> 32), cqe.res);
        }
    }

    /// <summary>Pumps until <paramref name="done"/> holds; fails past <paramref name="limit"/>.</summary>
    public void PumpUntil(Func<bool> done, TimeSpan limit, string what)
    {
        var clock = Stopwatch.StartNew();
        while (!done())
        {
            Assert.True(clock.Elapsed < limit, $"{what}: not done after {limit.TotalSeconds} s ({Results.Count} results, {InFlight} SQEs in flight)");
            Pump(TimeSpan.FromMilliseconds(100));
        }
    }

    /// <summary>As a queue ends: the backend must end its own pending SQEs (receive, timer, connect) promptly.</summary>
    public void End(TimeSpan limit)
    {
        Backend.OnQueueEnding(this);
        PumpUntil(() => InFlight == 0, limit, "ending the queue");
    }

    public void Dispose()
    {
        _ring.Dispose();
        Backend.Dispose();
    }
}

public sealed unsafe class NbdUringBackendTests : IDisposable
{
    private const int Tags = 64;
    private const int TagBytes = 64 * 1024;
    private readonly byte* _buffers = (byte*)NativeMemory.AlignedAlloc(Tags * TagBytes, 4096);

    public void Dispose() => NativeMemory.AlignedFree(_buffers);

    private byte* Buf(int tag) => _buffers + ((long)tag * TagBytes);

    private Span<byte> Span(int tag) => new(Buf(tag), TagBytes);

    private BackendRequest Read(int tag, long offset, int length = TagBytes) => new(IoOp.Read, IoFlags.None, offset, length, Buf(tag));

    private BackendRequest Write(int tag, long offset, int length = TagBytes, IoFlags flags = IoFlags.None) => new(IoOp.Write, flags, offset, length, Buf(tag));

    /// <summary>A memory target whose reads and writes take a while and count how many run at once.</summary>
    private sealed class SlowTarget(BlockTarget inner, int delayMs) : WrapperTarget(inner)
    {
        private int _now;
        private int _most;

        public int MostAtOnce => Volatile.Read(ref _most);

        private int Slowly(Func<int> call)
        {
            var n = Interlocked.Increment(ref _now);
            int seen;
            while ((seen = Volatile.Read(ref _most)) < n && Interlocked.CompareExchange(ref _most, n, seen) != seen)
            {
            }
            Thread.Sleep(delayMs);
            try
            {
                return call();
            }
            finally
            {
                Interlocked.Decrement(ref _now);
            }
        }

        public override int Read(Span<byte> buffer, long offset)
        {
            var copy = new byte[buffer.Length];
            var r = Slowly(() => Inner.Read(copy, offset));
            copy.AsSpan(0, Math.Max(0, Math.Min(r, copy.Length))).CopyTo(buffer);
            return r;
        }

        public override int Write(ReadOnlySpan<byte> data, long offset)
        {
            var copy = data.ToArray();
            return Slowly(() => Inner.Write(copy, offset));
        }
    }

    [Fact]
    public void AllTagsAreInFlightOnOneConnectionAndRepliesAreMatchedByCookie()
    {
        // Workers execution with a slow target: the server runs requests in parallel and replies
        // out of order, so only matching by cookie puts each reply in the right tag's buffer.
        var slow = new SlowTarget(new MemoryTarget(Tags * TagBytes), 20);
        using var server = new TestServer(slow, "disk", options: new NbdServerOptions { Execution = NbdExecution.Workers });
        using var target = new NbdTarget(NbdUri.Parse(server.Uri));
        using var ring = new NbdStepRing(target.CreateUringBackend(0)!);
        for (var tag = 0; tag < Tags; tag++)
        {
            Span(tag).Fill((byte)(tag + 1));
            Assert.True(ring.Start(tag, Write(tag, (long)tag * TagBytes)), "a write ended without going to the server");
        }
        ring.PumpUntil(() => ring.Results.Count == Tags, TimeSpan.FromSeconds(60), "64 writes");
        Assert.All(ring.Results.Values, r => Assert.Equal(TagBytes, r));
        var writesAtOnce = slow.MostAtOnce;

        // Read them back into other tags' buffers: tag t reads what tag (t + 7) % 64 wrote.
        for (var tag = 0; tag < Tags; tag++)
        {
            Span(tag).Clear();
            Assert.True(ring.Start(tag, Read(tag, (long)((tag + 7) % Tags) * TagBytes)));
        }
        ring.PumpUntil(() => ring.Results.Count == Tags, TimeSpan.FromSeconds(60), "64 reads");
        for (var tag = 0; tag < Tags; tag++)
        {
            Assert.Equal(TagBytes, ring.Results[tag]);
            var expected = (byte)(((tag + 7) % Tags) + 1);
            Assert.True(Span(tag).IndexOfAnyExcept(expected) < 0, $"tag {tag} read the wrong data");
        }
        Assert.True(writesAtOnce > 1 && slow.MostAtOnce > 1, $"the server never had two requests at once (writes {writesAtOnce}, at most {slow.MostAtOnce})");
        Assert.Equal(1, server.Server.ConnectionsAccepted);
        Assert.Equal(0, target.Reconnects);
        ring.End(TimeSpan.FromSeconds(10));
    }

    [Fact]
    public void FlushFuaTrimAndZeroesReachTheServer()
    {
        using var memory = new MemoryTarget(8 << 20);
        using var server = new TestServer(memory, "disk", ownsTarget: false);
        using var target = new NbdTarget(NbdUri.Parse(server.Uri));
        using var ring = new NbdStepRing(target.CreateUringBackend(0)!);
        Span(0).Fill(0x77);
        Assert.True(ring.Start(0, Write(0, 0, flags: IoFlags.Fua)));
        Assert.True(ring.Start(1, new BackendRequest(IoOp.Flush, IoFlags.None, 0, 0, null)));
        ring.PumpUntil(() => ring.Results.Count == 2, TimeSpan.FromSeconds(30), "write and flush");
        Assert.Equal(TagBytes, ring.Results[0]);
        Assert.Equal(0, ring.Results[1]);
        var back = new byte[TagBytes];
        Assert.Equal(TagBytes, memory.Read(back, 0));
        Assert.True(back.AsSpan().IndexOfAnyExcept((byte)0x77) < 0);

        ring.Results.Clear();
        Assert.True(ring.Start(2, new BackendRequest(IoOp.WriteZeroes, IoFlags.None, 4096, 8192, null)));
        Assert.True(ring.Start(3, new BackendRequest(IoOp.Discard, IoFlags.None, 32768, 4096, null)));
        ring.PumpUntil(() => ring.Results.Count == 2, TimeSpan.FromSeconds(30), "zero and trim");
        Assert.Equal(0, ring.Results[2]);
        Assert.Equal(0, ring.Results[3]);
        Assert.Equal(TagBytes, memory.Read(back, 0));
        Assert.True(back.AsSpan(4096, 8192).IndexOfAnyExcept((byte)0) < 0, "WRITE_ZEROES did not zero");
        Assert.True(back.AsSpan(0, 4096).IndexOfAnyExcept((byte)0x77) < 0, "WRITE_ZEROES went past its range");
        ring.End(TimeSpan.FromSeconds(10));
    }

    [Fact]
    public void ARequestPastTheServersMaximumIsServedInPartsAndReadOnlyRefusesWrites()
    {
        using var memory = new MemoryTarget(1 << 20);
        using var server = new TestServer(memory, "disk", readOnly: true, ownsTarget: false);
        using var target = new NbdTarget(NbdUri.Parse(server.Uri));
        using var ring = new NbdStepRing(target.CreateUringBackend(0)!);
        Assert.False(ring.Start(0, Write(0, 0)));
        Assert.Equal(-Errno.EROFS, ring.Results[0]);
        // No volatile cache on a read-only export: a flush ends at once.
        Assert.False(ring.Start(1, new BackendRequest(IoOp.Flush, IoFlags.None, 0, 0, null)));
        Assert.Equal(0, ring.Results[1]);
        Assert.True(ring.Start(2, Read(2, 4096)));
        ring.PumpUntil(() => ring.Results.ContainsKey(2), TimeSpan.FromSeconds(30), "read");
        Assert.Equal(TagBytes, ring.Results[2]);
        ring.End(TimeSpan.FromSeconds(10));
    }

    [Fact]
    public void ASilentUpstreamFailsRequestsAfterTheTimeoutTheQueueCanEndAndIoWorksWhenItReturns()
    {
        // The reviewer's case, on the ring: the peer stops answering without closing anything.
        using var memory = new MemoryTarget(8 << 20);
        using var server = new TestServer(memory, "disk", ownsTarget: false);
        using var proxy = SilentProxy.ToUnix(server.SocketPath);
        using var target = new NbdTarget(NbdUri.Parse(proxy.Uri("disk")), new NbdTargetOptions { Timeout = TimeSpan.FromSeconds(2) });
        using var ring = new NbdStepRing(target.CreateUringBackend(0)!);
        Span(0).Fill(0x5a);
        Assert.True(ring.Start(0, Write(0, 0, 4096)));
        ring.PumpUntil(() => ring.Results.Count == 1, TimeSpan.FromSeconds(30), "first write");
        Assert.Equal(4096, ring.Results[0]);

        proxy.Forwarding = false;
        var clock = Stopwatch.StartNew();
        for (var tag = 0; tag < 8; tag++)
        {
            Assert.True(ring.Start(tag, Read(tag, 0, 4096)));
        }
        ring.PumpUntil(() => ring.Results.Count == 8, TimeSpan.FromSeconds(30), "reads from a silent server");
        Assert.All(ring.Results.Values, r => Assert.Equal(-Errno.EIO, r));
        // Not before the 2 s deadline, and not much after it (a tick is 200 ms; generous for a loaded host).
        Assert.InRange(clock.Elapsed, TimeSpan.FromSeconds(1.9), TimeSpan.FromSeconds(30));
        Assert.True(target.Reconnects >= 1);

        // While it is still silent, a new request fails within the bound too.
        clock.Restart();
        Assert.True(ring.Start(1, Write(1, 4096, 4096)));
        ring.PumpUntil(() => ring.Results.ContainsKey(1), TimeSpan.FromSeconds(30), "a write to a silent server");
        Assert.Equal(-Errno.EIO, ring.Results[1]);

        // The upstream answers again: IO works, over a new connection.
        proxy.Forwarding = true;
        var accepted = proxy.Accepted;
        ring.Results.Clear();
        var deadline = Stopwatch.StartNew();
        int result;
        do
        {
            // The first request may still meet a connection made while the proxy dropped bytes.
            ring.Start(2, Read(2, 0, 4096));
            ring.PumpUntil(() => ring.Results.ContainsKey(2), TimeSpan.FromSeconds(30), "a read after the server returned");
            result = ring.Results[2];
        }
        while (result < 0 && deadline.Elapsed < TimeSpan.FromSeconds(20));
        Assert.Equal(4096, result);
        Assert.True(Span(2)[..4096].IndexOfAnyExcept((byte)0x5a) < 0);
        Assert.True(proxy.Accepted > accepted, "the backend did not reconnect");

        // The `del` case: the server goes silent with a request in flight; the queue still ends,
        // once the request has failed, with nothing of the backend's left pending.
        proxy.Forwarding = false;
        Assert.True(ring.Start(3, Read(3, 0, 4096)));
        ring.PumpUntil(() => ring.Results.ContainsKey(3), TimeSpan.FromSeconds(30), "the last read");
        Assert.Equal(-Errno.EIO, ring.Results[3]);
        ring.End(TimeSpan.FromSeconds(10));
    }

    [Fact]
    public void AConnectionThatDropsIsMadeAgainAndItsRequestsAreSentAgain()
    {
        using var memory = new MemoryTarget(8 << 20);
        using var server = new TestServer(memory, "disk", ownsTarget: false);
        using var proxy = SilentProxy.ToUnix(server.SocketPath);
        using var target = new NbdTarget(NbdUri.Parse(proxy.Uri("disk")), new NbdTargetOptions { Timeout = TimeSpan.FromSeconds(30) });
        using var ring = new NbdStepRing(target.CreateUringBackend(0)!);
        Span(0).Fill(0x11);
        Assert.True(ring.Start(0, Write(0, 0, 4096)));
        ring.PumpUntil(() => ring.Results.Count == 1, TimeSpan.FromSeconds(30), "first write");
        // The proxy holds the requests, then closes every connection: they must go again, on a new one.
        proxy.Forwarding = false;
        for (var tag = 0; tag < 4; tag++)
        {
            Assert.True(ring.Start(tag, Read(tag, 0, 4096)));
        }
        ring.Pump(TimeSpan.FromMilliseconds(200));
        Assert.Empty(ring.Results);
        proxy.Forwarding = true;
        proxy.CloseAll();
        ring.PumpUntil(() => ring.Results.Count == 4, TimeSpan.FromSeconds(30), "reads sent again");
        Assert.All(ring.Results.Values, r => Assert.Equal(4096, r));
        Assert.True(Span(3)[..4096].IndexOfAnyExcept((byte)0x11) < 0);
        Assert.Equal(1, target.Reconnects);
        ring.End(TimeSpan.FromSeconds(10));
    }

    [Fact]
    public void AnUnreachableServerFailsTheWaitingRequestsAndTheQueueEnds()
    {
        var memory = new MemoryTarget(1 << 20);
        var server = new TestServer(memory, "disk");
        using var target = new NbdTarget(NbdUri.Parse(server.Uri), new NbdTargetOptions { Timeout = TimeSpan.FromSeconds(2) });
        using var ring = new NbdStepRing(target.CreateUringBackend(0)!);
        server.Dispose();
        var clock = Stopwatch.StartNew();
        Assert.True(ring.Start(0, Read(0, 0, 4096)));
        ring.PumpUntil(() => ring.Results.Count == 1, TimeSpan.FromSeconds(30), "a read with the server gone");
        Assert.Equal(-Errno.EIO, ring.Results[0]);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(30));
        ring.End(TimeSpan.FromSeconds(10));
    }

    [Fact]
    public void AServerWithoutMultiConnIsServedByOneQueue()
    {
        using var server = new TestServer(new MemoryTarget(1 << 20), "disk", readOnly: true);
        using var target = new NbdTarget(NbdUri.Parse(server.Uri));
        // Our server offers CAN_MULTI_CONN; a target with one connection stands for one that does not.
        using var single = new NbdTarget(NbdUri.Parse(server.Uri), new NbdTargetOptions { Connections = 1 });
        using var q1 = target.CreateUringBackend(1);
        Assert.NotNull(q1);
        var e = Assert.Throws<NotSupportedException>(() => single.CreateUringBackend(1));
        Assert.Contains("-q 1", e.Message, StringComparison.Ordinal);
    }
}
