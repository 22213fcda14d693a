using System.Buffers.Binary;
using System.Diagnostics;
using System.Text;
using UblkSharp.Nbd;
using UblkSharp.Targets;
using static UblkSharp.Nbd.Protocol.NbdProtocol;

namespace UblkSharp.Tests.Nbd;

/// <summary>
/// Malformed handshakes and requests get the error the protocol asks for, or a clean disconnect;
/// a client that breaks off loses nothing it was told was written; other clients keep being served.
/// </summary>
public class NbdBadInputTests
{
    // ---- handshake ----

    [Fact]
    public void UnknownClientFlagsEndTheConnection()
    {
        using var s = new TestServer(new MemoryTarget(1 << 20));
        using var c = new RawNbd(s.SocketPath);
        Assert.Equal(FlagFixedNewstyle | FlagNoZeroes, c.ReadGreeting());
        c.SendClientFlags(ClientFlagFixedNewstyle | 0x100);
        Assert.True(c.IsClosedByServer());
        AssertStillServes(s);
    }

    [Fact]
    public void BadOptionMagicEndsTheConnection()
    {
        using var s = new TestServer(new MemoryTarget(1 << 20));
        using var c = new RawNbd(s.SocketPath);
        c.ReadGreeting();
        c.SendClientFlags();
        c.SendOption(OptGo, RawNbd.GoData(""), magic: 0x1122334455667788);
        Assert.True(c.IsClosedByServer());
        Assert.Equal(1, s.Server.ProtocolErrors);
    }

    [Fact]
    public void UnknownAndMalformedOptionsAreAnsweredAndTheClientMayGoOn()
    {
        using var s = new TestServer(new MemoryTarget(1 << 20), "disk");
        using var c = new RawNbd(s.SocketPath);
        c.ReadGreeting();
        c.SendClientFlags();
        Expect(c, 42, [1, 2, 3], RepErrUnsup);
        Expect(c, OptGo, [0, 0], RepErrInvalid);                                // shorter than 6 bytes
        Expect(c, OptGo, [0, 0, 0, 9, 0, 0], RepErrInvalid);                    // name runs past the end
        var go = RawNbd.GoData("disk", InfoName);
        Expect(c, OptGo, go[..^2], RepErrInvalid);                              // one info request short
        Expect(c, OptInfo, RawNbd.GoData("nope"), RepErrUnknown);
        Expect(c, OptGo, RawNbd.GoData("nope"), RepErrUnknown);
        Expect(c, OptList, [1], RepErrInvalid);
        Expect(c, OptStructuredReply, [1], RepErrInvalid);
        Expect(c, OptStartTls, [], RepErrUnsup);
        Expect(c, OptSetMetaContext, RawNbd.MetaData("disk", BaseAllocation), RepErrInvalid); // before structured replies
        Expect(c, OptStructuredReply, [], RepAck);
        Expect(c, OptSetMetaContext, RawNbd.MetaData("disk", BaseAllocation)[..^3], RepErrInvalid);
        Expect(c, OptSetMetaContext, [0, 0, 0, 0], RepErrInvalid);
        Expect(c, OptListMetaContext, RawNbd.MetaData("nope"), RepErrUnknown);
        // LIST: one SERVER reply per export, then ACK.
        c.SendOption(OptList, []);
        var (_, type, data) = c.ReadOptionReply();
        Assert.Equal(RepServer, type);
        Assert.Equal("disk", Encoding.UTF8.GetString(data, 4, (int)BinaryPrimitives.ReadUInt32BigEndian(data)));
        Assert.Equal(RepAck, c.ReadOptionReply().Type);
        // LIST_META_CONTEXT with no query lists base:allocation.
        c.SendOption(OptListMetaContext, RawNbd.MetaData("disk"));
        (_, type, data) = c.ReadOptionReply();
        Assert.Equal(RepMetaContext, type);
        Assert.Equal(BaseAllocation, Encoding.UTF8.GetString(data, 4, data.Length - 4));
        Assert.Equal(RepAck, c.ReadOptionReply().Type);
        // INFO then GO still work on the same connection.
        c.SendOption(OptInfo, go);
        Assert.Equal(RepInfo, c.ReadOptionReply().Type); // EXPORT
        Assert.Equal(RepInfo, c.ReadOptionReply().Type); // NAME
        Assert.Equal(RepInfo, c.ReadOptionReply().Type); // BLOCK_SIZE
        Assert.Equal(RepAck, c.ReadOptionReply().Type);
        c.SendOption(OptGo, RawNbd.GoData("disk"));
        Assert.Equal(RepInfo, c.ReadOptionReply().Type);
        Assert.Equal(RepInfo, c.ReadOptionReply().Type);
        Assert.Equal(RepAck, c.ReadOptionReply().Type);
        c.Request(CmdRead, 7, 0, 4096);
        var reply = c.ReadAnyReply();
        Assert.Equal((7ul, 0u, ReplyTypeOffsetData), (reply.Cookie, reply.Error, reply.Type));
        Assert.Equal(0, s.Server.ProtocolErrors);
    }

    [Fact]
    public void ExportNameEntersTransmissionOrDisconnects()
    {
        using var s = new TestServer(new MemoryTarget(1 << 20), "disk");
        using (var c = new RawNbd(s.SocketPath))
        {
            c.ReadGreeting();
            c.SendClientFlags(ClientFlagFixedNewstyle); // no NO_ZEROES: 124 zero bytes follow
            c.SendOption(OptExportName, Encoding.UTF8.GetBytes("disk"));
            var reply = c.Receive(134);
            Assert.Equal(1ul << 20, BinaryPrimitives.ReadUInt64BigEndian(reply));
            Assert.True(reply.AsSpan(10).IndexOfAnyExcept((byte)0) < 0);
            c.Request(CmdWrite, 1, 0, 512, payload: new byte[512]);
            Assert.Equal((0u, 1ul), c.ReadSimpleReply());
        }
        using (var c = new RawNbd(s.SocketPath))
        {
            c.ReadGreeting();
            c.SendClientFlags();
            c.SendOption(OptExportName, Encoding.UTF8.GetBytes("nope"));
            Assert.True(c.IsClosedByServer());
        }
    }

    [Fact]
    public void AbortIsAcknowledgedThenClosed()
    {
        using var s = new TestServer(new MemoryTarget(1 << 20));
        using var c = new RawNbd(s.SocketPath);
        c.ReadGreeting();
        c.SendClientFlags();
        c.SendOption(OptAbort, []);
        Assert.Equal(RepAck, c.ReadOptionReply().Type);
        Assert.True(c.IsClosedByServer());
    }

    [Fact]
    public void OversizedOptionsAndEndlessOptionsAreCutOff()
    {
        using var s = new TestServer(new MemoryTarget(1 << 20));
        using (var c = new RawNbd(s.SocketPath))
        {
            c.ReadGreeting();
            c.SendClientFlags();
            c.SendOption(OptGo, [], length: 100 << 20); // claims 100 MiB of data
            Assert.True(c.IsClosedByServer());
        }
        using (var c = new RawNbd(s.SocketPath))
        {
            c.ReadGreeting();
            c.SendClientFlags();
            var closed = false;
            for (var i = 0; i < 1000 && !closed; i++)
            {
                try
                {
                    c.SendOption(99, []);
                    c.ReadOptionReply();
                }
                catch (Exception e) when (e is EndOfStreamException or System.Net.Sockets.SocketException)
                {
                    closed = true;
                }
            }
            Assert.True(closed, "a client may not negotiate forever");
        }
        AssertStillServes(s);
    }

    [Fact]
    public void AStalledHandshakeTimesOut()
    {
        using var s = new TestServer(new MemoryTarget(1 << 20), options: new NbdServerOptions { HandshakeTimeout = TimeSpan.FromMilliseconds(500) });
        // The clock starts before connecting, so it can only run longer than the server's, which
        // starts at accept: a client slow to read the greeting cannot make the timeout look early.
        var clock = Stopwatch.StartNew();
        using var c = new RawNbd(s.SocketPath);
        c.ReadGreeting();
        Assert.True(c.IsClosedByServer(30_000));
        Assert.InRange(clock.Elapsed, TimeSpan.FromMilliseconds(450), TimeSpan.FromSeconds(30));
        AssertStillServes(s);
    }

    // ---- transmission ----

    [Fact]
    public void BadRequestMagicDisconnects()
    {
        using var s = new TestServer(new MemoryTarget(1 << 20));
        using var c = new RawNbd(s.SocketPath).Connect();
        c.Request(CmdRead, 1, 0, 512, magic: 0xdeadbeef);
        Assert.True(c.IsClosedByServer());
        AssertStillServes(s);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void RefusedRequestsGetTheProtocolsErrorsAndTheConnectionGoesOn(bool structured)
    {
        const uint size = 1 << 20;
        using var s = new TestServer(new MemoryTarget(size));
        using var c = new RawNbd(s.SocketPath).Connect(structured: structured);
        ulong cookie = 100;
        (uint Error, string Message) Refused(ushort type, ulong offset, uint length, ushort flags = 0, byte[]? payload = null)
        {
            c.Request(type, ++cookie, offset, length, flags, payload);
            var r = c.ReadAnyReply();
            Assert.Equal(cookie, r.Cookie);
            if (structured)
            {
                Assert.Equal(ReplyTypeError, r.Type);
                var messageLength = BinaryPrimitives.ReadUInt16BigEndian(r.Payload.AsSpan(4));
                return (r.Error, Encoding.UTF8.GetString(r.Payload, 6, messageLength));
            }
            return (r.Error, "");
        }
        Assert.Equal(EINVAL, Refused(42, 0, 512).Error);                                    // unknown command
        Assert.Equal(EINVAL, Refused(CmdRead, 0, 512, flags: 0x100).Error);                 // unknown flag
        Assert.Equal(EINVAL, Refused(CmdRead, 0, 512, flags: CmdFlagNoHole).Error);         // flag of another command
        Assert.Equal(EINVAL, Refused(CmdWrite, 0, 512, CmdFlagReqOne, new byte[512]).Error);
        if (!structured)
        {
            Assert.Equal(EINVAL, Refused(CmdRead, 0, 512, flags: CmdFlagDf).Error);         // DF needs structured replies
        }
        var (error, message) = Refused(CmdRead, size - 512, 1024);
        Assert.Equal(EINVAL, error);                                                        // past the end
        if (structured)
        {
            Assert.Contains("past the end", message, StringComparison.Ordinal);
        }
        Assert.Equal(EINVAL, Refused(CmdRead, ulong.MaxValue - 100, 512).Error);            // offset overflows
        Assert.Equal(ENOSPC, Refused(CmdWrite, size, 4096, payload: new byte[4096]).Error); // write past the end: payload skipped
        Assert.Equal(ENOSPC, Refused(CmdWriteZeroes, size - 512, 4096).Error);
        Assert.Equal(EINVAL, Refused(CmdTrim, size, 512).Error);
        Assert.Equal(EINVAL, Refused(CmdCache, size + 512, 512).Error);
        Assert.Equal(EINVAL, Refused(CmdRead, 0, 0).Error);                                 // zero length
        Assert.Equal(EINVAL, Refused(CmdFlush, 512, 0).Error);                              // FLUSH takes 0, 0
        Assert.Equal(EINVAL, Refused(CmdBlockStatus, 0, 4096).Error);                       // no meta context chosen
        Assert.Equal(EINVAL, Refused(CmdRead, 0, 64 << 20).Error);                          // larger than the maximum payload
        Assert.Equal(EINVAL, Refused(CmdWrite, 0, 40 << 20, payload: new byte[40 << 20]).Error); // too large, but skippable
        // Still in step: a real request works.
        c.Request(CmdWrite, 1, 4096, 4096, payload: Enumerable.Repeat((byte)7, 4096).ToArray());
        Assert.Equal(0u, c.ReadAnyReply().Error);
        c.Request(CmdRead, 2, 4096, 4096);
        var ok = c.ReadAnyReply(simpleReadLength: 4096);
        Assert.Equal(0u, ok.Error);
        Assert.True((structured ? ok.Payload.AsSpan(8) : ok.Payload.AsSpan()).IndexOfAnyExcept((byte)7) < 0);
        Assert.Equal(0, s.Server.ProtocolErrors);
        Assert.True(s.Server.RequestsRefused >= 15, $"{s.Server.RequestsRefused} refused");
    }

    [Fact]
    public void AWriteTooLargeToSkipDisconnects()
    {
        using var s = new TestServer(new MemoryTarget(1 << 20));
        using var c = new RawNbd(s.SocketPath).Connect();
        // 4 GiB of payload would follow: more than is worth reading just to drop it.
        c.Request(CmdWrite, 1, 0, uint.MaxValue);
        Assert.True(c.IsClosedByServer());
        AssertStillServes(s);
    }

    [Fact]
    public void ReadOnlyExportsRefuseWritesWithEperm()
    {
        using var s = new TestServer(new MemoryTarget(1 << 20), readOnly: true);
        using var c = new RawNbd(s.SocketPath).Connect();
        Assert.NotEqual(0, c.TransmissionFlags & FlagReadOnly);
        c.Request(CmdWrite, 1, 0, 512, payload: new byte[512]);
        Assert.Equal((EPERM, 1ul), c.ReadSimpleReply());
        c.Request(CmdTrim, 2, 0, 512);
        Assert.Equal((EPERM, 2ul), c.ReadSimpleReply());
        c.Request(CmdWriteZeroes, 3, 0, 512);
        Assert.Equal((EPERM, 3ul), c.ReadSimpleReply());
        c.Request(CmdWrite, 4, 0, 512, flags: CmdFlagFua, payload: new byte[512]);
        Assert.Equal((EINVAL, 4ul), c.ReadSimpleReply()); // FUA is not offered on a read-only export
        c.Request(CmdRead, 5, 0, 512);
        Assert.Equal((0u, 5ul), c.ReadSimpleReply());
    }

    [Fact]
    public void BlockStatusAndDontFragmentWithStructuredReplies()
    {
        using var s = new TestServer(InteropLoop(out var path));
        using var c = new RawNbd(s.SocketPath).Connect(structured: true, baseAllocation: true);
        Assert.NotEqual(0, c.TransmissionFlags & FlagSendDf);
        c.Request(CmdBlockStatus, 1, 0, 4 << 20);
        var r = c.ReadAnyReply();
        Assert.Equal((1ul, 0u, ReplyTypeBlockStatus), (r.Cookie, r.Error, r.Type));
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32BigEndian(r.Payload)); // the id SET_META_CONTEXT gave
        var descriptors = Descriptors(r.Payload);
        Assert.Equal([(1u << 20, StateHole | StateZero), (1u << 20, 0u), (2u << 20, StateHole | StateZero)], descriptors);
        c.Request(CmdBlockStatus, 2, 0, 4 << 20, flags: CmdFlagReqOne);
        Assert.Equal([(1u << 20, StateHole | StateZero)], Descriptors(c.ReadAnyReply().Payload));
        c.Request(CmdRead, 3, 1 << 20, 65536, flags: CmdFlagDf);
        r = c.ReadAnyReply();
        Assert.Equal((3ul, ReplyTypeOffsetData, 8 + 65536), (r.Cookie, r.Type, r.Payload.Length));
        File.Delete(path);
    }

    [Fact]
    public void RepliesMayCompleteOutOfOrder()
    {
        var slow = new SlowAtZeroTarget(1 << 20, TimeSpan.Zero);
        using var s = new TestServer(slow, options: new NbdServerOptions { Execution = NbdExecution.Workers });
        using var c = new RawNbd(s.SocketPath).Connect(structured: true); // replies that describe themselves
        // The slow read is held until the other two have been answered (or 5 s, when the server
        // answers in order), so the order does not depend on how loaded the machine is.
        slow.Gate.Reset();
        c.Request(CmdRead, 1, 0, 4096);     // held
        c.Request(CmdRead, 2, 8192, 4096);  // fast
        c.Request(CmdWrite, 3, 16384, 4096, payload: new byte[4096]);
        var first = c.ReadAnyReply().Cookie;
        var second = c.ReadAnyReply().Cookie;
        slow.Gate.Set();
        var third = c.ReadAnyReply().Cookie;
        Assert.Equal(1ul, third);
        Assert.Equal([2ul, 3ul], new[] { first, second }.Order());
    }

    [Fact]
    public void AutoMovesASlowTargetToTheWorkers()
    {
        var slow = new SlowAtZeroTarget(1 << 20, TimeSpan.FromMilliseconds(500));
        using var s = new TestServer(slow);
        using var c = new RawNbd(s.SocketPath).Connect(structured: true);
        // A few slow calls, one at a time: they run on the connection's thread and teach it the target is slow.
        for (ulong i = 1; i <= 4; i++)
        {
            c.Request(CmdRead, i, 0, 4096);
            Assert.Equal(i, c.ReadAnyReply().Cookie);
        }
        // Now a slow request no longer holds up the fast one behind it: it is held until the fast
        // one is answered (or 5 s, when it blocks the connection), whatever the machine's load.
        slow.Gate.Reset();
        c.Request(CmdRead, 10, 0, 4096);
        c.Request(CmdRead, 11, 8192, 4096);
        var first = c.ReadAnyReply().Cookie;
        slow.Gate.Set();
        Assert.Equal(11ul, first);
        Assert.Equal(10ul, c.ReadAnyReply().Cookie);
    }

    [Fact]
    public void DisconnectFinishesRequestsInFlightFirst()
    {
        using var s = new TestServer(new SlowAtZeroTarget(1 << 20, TimeSpan.FromMilliseconds(300)), options: new NbdServerOptions { Execution = NbdExecution.Workers });
        using var c = new RawNbd(s.SocketPath).Connect();
        c.Request(CmdRead, 1, 0, 4096);
        c.Request(CmdDisc, 2, 0, 0);
        var r = c.ReadAnyReply(4096);
        Assert.Equal((1ul, 0u), (r.Cookie, r.Error));
        Assert.True(c.IsClosedByServer());
    }

    [Fact]
    public void AClientThatLeavesMidWriteLosesNothingItWasToldWasWritten()
    {
        const int blocks = 64;
        using var s = new TestServer(new MemoryTarget(16 << 20), options: new NbdServerOptions { Execution = NbdExecution.Workers });
        // Another client reads all the while: it must keep being served.
        var stop = false;
        long otherReads = 0;
        Exception? otherFailed = null;
        var other = new Thread(() =>
        {
            try
            {
                using var o = new RawNbd(s.SocketPath).Connect();
                ulong cookie = 0;
                while (!Volatile.Read(ref stop))
                {
                    o.Request(CmdRead, ++cookie, 8 << 20, 65536);
                    Assert.Equal(0u, o.ReadAnyReply(65536).Error);
                    Interlocked.Increment(ref otherReads);
                }
            }
            catch (Exception e)
            {
                otherFailed = e;
            }
        });
        other.Start();
        var expected = new byte[blocks][];
        using (var c = new RawNbd(s.SocketPath).Connect())
        {
            var rng = new Random(11);
            for (var i = 0; i < blocks; i++)
            {
                expected[i] = new byte[65536];
                rng.NextBytes(expected[i]);
                c.Request(CmdWrite, (ulong)i, (ulong)i * 65536, 65536, payload: expected[i]);
            }
            for (var i = 0; i < blocks; i++)
            {
                Assert.Equal(0u, c.ReadSimpleReply().Error);
            }
            // A write whose payload never finishes arriving, then the client is gone.
            var header = new byte[RequestSize];
            BinaryPrimitives.WriteUInt32BigEndian(header, RequestMagic);
            BinaryPrimitives.WriteUInt16BigEndian(header.AsSpan(6), CmdWrite);
            BinaryPrimitives.WriteUInt64BigEndian(header.AsSpan(16), 0);
            BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(24), 65536);
            c.Send([.. header, .. new byte[30000]]);
        }
        WaitFor(() => s.Server.ActiveConnections == 1, "the broken connection to close");
        using (var check = new RawNbd(s.SocketPath).Connect())
        {
            for (var i = 0; i < blocks; i++)
            {
                check.Request(CmdRead, (ulong)i, (ulong)i * 65536, 65536);
                var r = check.ReadAnyReply(65536);
                Assert.Equal(0u, r.Error);
                Assert.True(expected[i].AsSpan().SequenceEqual(r.Payload), $"block {i} differs");
            }
        }
        var before = Interlocked.Read(ref otherReads);
        WaitFor(() => Interlocked.Read(ref otherReads) > before + 10 || Volatile.Read(ref otherFailed) is not null, "the other client to keep being served");
        Volatile.Write(ref stop, true);
        Assert.True(other.Join(TimeSpan.FromSeconds(10)));
        Assert.Null(otherFailed);
        Assert.True(Interlocked.Read(ref otherReads) > before, "the other client stopped being served");
        Assert.Equal(0, s.Server.InternalErrors);
    }

    [Theory]
    [InlineData(NbdExecution.Inline)]
    [InlineData(NbdExecution.Workers)]
    public void FuaIsHonouredAndFlushReachesTheTarget(NbdExecution execution)
    {
        using var target = new RecordingTarget(1 << 20);
        using var s = new TestServer(target, options: new NbdServerOptions { Execution = execution });
        using var c = new RawNbd(s.SocketPath).Connect();
        Assert.NotEqual(0, c.TransmissionFlags & FlagSendFua);
        Assert.NotEqual(0, c.TransmissionFlags & FlagSendFlush);
        string Do(ushort type, ushort flags, uint length, byte[]? payload = null)
        {
            lock (target.Log)
            {
                target.Log.Clear();
            }
            c.Request(type, 1, type == CmdFlush ? 0u : 4096u, length, flags, payload);
            Assert.Equal((0u, 1ul), c.ReadSimpleReply());
            // The reply is sent after the target's calls return: the log is complete.
            lock (target.Log)
            {
                return string.Join(",", target.Log);
            }
        }
        Assert.Equal("write", Do(CmdWrite, 0, 4096, new byte[4096]));
        Assert.Equal("writefua", Do(CmdWrite, CmdFlagFua, 4096, new byte[4096]));
        Assert.Equal("zeroes,flush", Do(CmdWriteZeroes, CmdFlagFua, 4096));
        Assert.Equal("discard,flush", Do(CmdTrim, CmdFlagFua, 4096));
        Assert.Equal("discard", Do(CmdTrim, 0, 4096));
        Assert.Equal("flush", Do(CmdFlush, 0, 0));
    }

    [Fact]
    public void ConnectionsBeyondTheLimitAreClosedAtOnce()
    {
        using var s = new TestServer(new MemoryTarget(1 << 20), options: new NbdServerOptions { MaxConnections = 2 });
        using var a = new RawNbd(s.SocketPath).Connect();
        using var b = new RawNbd(s.SocketPath).Connect();
        using var c = new RawNbd(s.SocketPath);
        Assert.True(c.IsClosedByServer());
        Assert.Equal(1, s.Server.ConnectionsRefused);
        a.Request(CmdRead, 1, 0, 512);
        Assert.Equal((0u, 1ul), a.ReadSimpleReply());
    }

    [Fact]
    public void ATargetThatThrowsFailsOneRequestWithEio()
    {
        using var s = new TestServer(new ThrowingTarget(1 << 20));
        using var c = new RawNbd(s.SocketPath).Connect();
        c.Request(CmdRead, 1, 0, 512);
        Assert.Equal((EIO, 1ul), c.ReadSimpleReply());
        c.Request(CmdRead, 2, 4096, 512);
        Assert.Equal((0u, 2ul), c.ReadSimpleReply());
        Assert.Equal(1, s.Server.TargetExceptions);
    }

    [Fact]
    public void ShortAndRetriedTargetStepsStillCompleteWholeRequests()
    {
        // The fault target's schedule applies on NBD too: short counts and EAGAIN are continued.
        var target = new FaultTarget(new MemoryTarget(8 << 20), new FaultSchedule { Seed = 3, ShortIo = 0.3, Again = 0.2 });
        using var s = new TestServer(target);
        var output = Tools.Ok("qemu-io", "-f", "raw", "-c", "write -P 0x5c 0 4M", "-c", "read -P 0x5c 0 4M", "-c", "write -z 1M 1M", "-c", "read -P 0 1M 1M", s.Uri);
        Assert.DoesNotContain("fail", output, StringComparison.OrdinalIgnoreCase);
    }

    // ---- helpers ----

    private static void Expect(RawNbd c, uint option, byte[] data, uint reply)
    {
        c.SendOption(option, data);
        var r = c.ReadOptionReply();
        Assert.Equal(option, r.Option);
        Assert.Equal(reply, r.Type);
    }

    internal static void AssertStillServes(TestServer s)
    {
        using var c = new RawNbd(s.SocketPath).Connect(s.Export.Name);
        c.Request(CmdRead, 77, 0, 512);
        var r = c.ReadAnyReply(512);
        Assert.Equal((77ul, 0u), (r.Cookie, r.Error));
    }

    internal static void WaitFor(Func<bool> condition, string what)
    {
        var clock = Stopwatch.StartNew();
        while (!condition())
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(20), $"timed out waiting for {what}");
            Thread.Sleep(10);
        }
    }

    private static List<(uint, uint)> Descriptors(byte[] payload)
    {
        var list = new List<(uint, uint)>();
        for (var i = 4; i + 8 <= payload.Length; i += 8)
        {
            list.Add((BinaryPrimitives.ReadUInt32BigEndian(payload.AsSpan(i)), BinaryPrimitives.ReadUInt32BigEndian(payload.AsSpan(i + 4))));
        }
        return list;
    }

    private static LoopTarget InteropLoop(out string path) => NbdInteropTests.LoopOn(out path, 4 << 20, [(1 << 20, 1 << 20)]);

    /// <summary>
    /// Reads at offset 0 take <c>delay</c>, and wait while <see cref="Gate"/> is closed (5 s at
    /// most, so a server that waits on them cannot hang the test); everything else is immediate.
    /// </summary>
    internal sealed class SlowAtZeroTarget(long size, TimeSpan delay) : BlockTarget
    {
        private readonly MemoryTarget _inner = new(size);

        public ManualResetEventSlim Gate { get; } = new(true);

        public override long Size => _inner.Size;

        public override string Kind => "slow";

        public override int Read(Span<byte> buffer, long offset)
        {
            if (offset == 0)
            {
                Thread.Sleep(delay);
                Gate.Wait(TimeSpan.FromSeconds(5));
            }
            return _inner.Read(buffer, offset);
        }

        public override int Write(ReadOnlySpan<byte> data, long offset) => _inner.Write(data, offset);

        protected override void Dispose(bool disposing)
        {
            Gate.Set();
            _inner.Dispose();
            base.Dispose(disposing);
        }
    }

    /// <summary>A memory target that logs which of its write-side calls the server made.</summary>
    private sealed class RecordingTarget(long size) : BlockTarget
    {
        private readonly MemoryTarget _inner = new(size);

        public List<string> Log { get; } = [];

        public override long Size => _inner.Size;

        public override string Kind => "recording";

        public override int Read(Span<byte> buffer, long offset) => _inner.Read(buffer, offset);

        public override int Write(ReadOnlySpan<byte> data, long offset) => Note("write", _inner.Write(data, offset));

        public override int WriteFua(ReadOnlySpan<byte> data, long offset) => Note("writefua", _inner.Write(data, offset));

        public override int Flush() => Note("flush", 0);

        public override int Discard(long offset, long length) => Note("discard", _inner.Discard(offset, length));

        public override int WriteZeroes(long offset, long length, bool mayUnmap) => Note("zeroes", _inner.WriteZeroes(offset, length, mayUnmap));

        private int Note(string what, int result)
        {
            lock (Log)
            {
                Log.Add(what);
            }
            return result;
        }

        protected override void Dispose(bool disposing)
        {
            _inner.Dispose();
            base.Dispose(disposing);
        }
    }

    private sealed class ThrowingTarget(long size) : BlockTarget
    {
        public override long Size => size;

        public override string Kind => "throws";

        public override int Read(Span<byte> buffer, long offset) => offset == 0 ? throw new InvalidOperationException("boom") : buffer.Length;
    }
}
