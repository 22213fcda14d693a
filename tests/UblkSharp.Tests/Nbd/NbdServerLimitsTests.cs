using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using UblkSharp.Nbd;
using UblkSharp.Nbd.Protocol;
using UblkSharp.Targets;
using static UblkSharp.Nbd.Protocol.NbdProtocol;

namespace UblkSharp.Tests.Nbd;

/// <summary>
/// The limits that keep a server standing against clients that hold connections open, trickle
/// their handshakes, or ask for more than the server offered. Serial: one test fills the server
/// with thousands of connections, another counts the process's allocations.
/// </summary>
[Collection(nameof(NbdSerialCollection))]
public class NbdServerLimitsTests(ITestOutputHelper output)
{
    [Fact]
    public void ConnectionsBeyondTheLimitAreClosedCleanlyAndLoggedOncePerInterval()
    {
        var log = new CapturingLoggerFactory();
        using var s = new TestServer(new MemoryTarget(1 << 20), options: new NbdServerOptions { MaxConnections = 2, LoggerFactory = log });
        using var a = new RawNbd(s.SocketPath).Connect();
        using var b = new RawNbd(s.SocketPath).Connect();
        for (var i = 0; i < 20; i++)
        {
            using var c = new RawNbd(s.SocketPath, receiveTimeoutMs: 5000);
            // A clean close: end of stream, before any greeting (a reset would throw).
            Assert.Equal(0, c.Socket.Receive(new byte[64]));
        }
        Assert.Equal(20, s.Server.ConnectionsRefused);
        Assert.Equal(0, s.Server.ConnectionsEvicted);
        var refusals = log.Messages.Where(l => l.Contains("connection refused", StringComparison.Ordinal)).ToList();
        Assert.Single(refusals);
        Assert.Contains("--max-connections", refusals[0], StringComparison.Ordinal);
        a.Request(CmdRead, 1, 0, 512);
        Assert.Equal((0u, 1ul), a.ReadSimpleReply());
        b.Request(CmdRead, 2, 0, 512);
        Assert.Equal((0u, 2ul), b.ReadSimpleReply());
    }

    [Fact]
    public void ANewClientTakesThePlaceOfTheOldestHandshake()
    {
        using var s = new TestServer(new MemoryTarget(1 << 20), options: new NbdServerOptions { MaxConnections = 2 });
        using var idle1 = new RawNbd(s.SocketPath);
        idle1.ReadGreeting();
        using var idle2 = new RawNbd(s.SocketPath);
        idle2.ReadGreeting();
        using var real = new RawNbd(s.SocketPath).Connect();
        Assert.True(idle1.IsClosedByServer(), "the oldest handshake was not closed");
        real.Request(CmdRead, 1, 0, 512);
        Assert.Equal((0u, 1ul), real.ReadSimpleReply());
        Assert.Equal(1, s.Server.ConnectionsEvicted);
        Assert.Equal(0, s.Server.ConnectionsRefused);
        // idle2 is still there: one place was needed, one was taken.
        Assert.False(idle2.IsClosedByServer(200));
    }

    [Fact]
    public void AHandshakeTrickledAByteAtATimeIsCutOffAtItsDeadline()
    {
        using var s = new TestServer(new MemoryTarget(1 << 20), options: new NbdServerOptions { HandshakeTimeout = TimeSpan.FromSeconds(1) });
        var clock = Stopwatch.StartNew();
        using var c = new RawNbd(s.SocketPath);
        c.ReadGreeting();
        // A valid handshake, one byte every 200 ms: each receive sees data well within the
        // timeout, so only a deadline from the connect can end it.
        var stream = Handshake("");
        var closedAt = TimeSpan.Zero;
        for (var i = 0; i < stream.Length && clock.Elapsed < TimeSpan.FromSeconds(10); i++)
        {
            try
            {
                c.Send([stream[i]]);
            }
            catch (SocketException)
            {
                break;
            }
            if (c.IsClosedByServer(200))
            {
                closedAt = clock.Elapsed;
                break;
            }
        }
        output.WriteLine($"cut off after {closedAt.TotalSeconds:F2} s");
        Assert.InRange(closedAt, TimeSpan.FromSeconds(0.9), TimeSpan.FromSeconds(4));
        Assert.Equal(1, s.Server.HandshakeTimeouts);
        NbdBadInputTests.AssertStillServes(s);
    }

    [Fact]
    public void IdleConnectionsAreClosedAfterTheIdleTimeoutAndBusyOnesAreNot()
    {
        var log = new CapturingLoggerFactory();
        using var s = new TestServer(new MemoryTarget(1 << 20), options: new NbdServerOptions { IdleTimeout = TimeSpan.FromSeconds(1), LoggerFactory = log });
        using var idle = new RawNbd(s.SocketPath).Connect();
        using var busy = new RawNbd(s.SocketPath).Connect();
        var clock = Stopwatch.StartNew();
        TimeSpan? idleClosedAt = null;
        ulong cookie = 0;
        while (clock.Elapsed < TimeSpan.FromSeconds(3))
        {
            busy.Request(CmdRead, ++cookie, 0, 512);
            Assert.Equal((cookie, 0u), Reply(busy));
            if (idleClosedAt is null && idle.IsClosedByServer(300))
            {
                idleClosedAt = clock.Elapsed;
            }
        }
        output.WriteLine($"idle connection closed after {idleClosedAt?.TotalSeconds:F2} s; the busy one sent {cookie} requests");
        Assert.NotNull(idleClosedAt);
        Assert.InRange(idleClosedAt.Value, TimeSpan.FromSeconds(0.9), TimeSpan.FromSeconds(3));
        Assert.Equal(1, s.Server.IdleConnectionsClosed);
        Assert.Single(log.Messages, l => l.Contains("idle", StringComparison.Ordinal));
        busy.Request(CmdRead, ++cookie, 0, 512);
        Assert.Equal((cookie, 0u), Reply(busy));
    }

    private static (ulong, uint) Reply(RawNbd c)
    {
        var r = c.ReadAnyReply(512);
        return (r.Cookie, r.Error);
    }

    [Fact]
    public void WithoutAnIdleTimeoutAnIdleConnectionStaysOpen()
    {
        using var s = new TestServer(new MemoryTarget(1 << 20), options: new NbdServerOptions { HandshakeTimeout = TimeSpan.FromMilliseconds(500) });
        using var c = new RawNbd(s.SocketPath).Connect();
        // Longer than the handshake timeout and several reaper rounds.
        Assert.False(c.IsClosedByServer(1500));
        c.Request(CmdRead, 1, 0, 512);
        Assert.Equal((0u, 1ul), c.ReadSimpleReply());
        Assert.Equal(0, s.Server.IdleConnectionsClosed);
        Assert.Equal(0, s.Server.HandshakeTimeouts);
    }

    [Fact]
    public void RequestsBeyondTheAdvertisedMaximumAreRefusedWithoutAllocatingTheirLength()
    {
        using var s = new TestServer(new MemoryTarget(64 << 20), tcp: true);
        using var c = new RawNbd(new IPEndPoint(IPAddress.Loopback, s.Server.Address.Port)).Connect();
        var max = c.MaximumPayload;
        Assert.Equal((uint)NbdExport.MaxPayload, max);
        // The payload of a skippable oversized write, sent from one small buffer.
        var chunk = new byte[1 << 20];
        var before = GC.GetTotalAllocatedBytes(precise: true);
        c.Request(CmdRead, 1, 0, max + 4096);
        Assert.Equal((EINVAL, 1ul), c.ReadSimpleReply());
        c.Request(CmdRead, 2, 0, uint.MaxValue);
        Assert.Equal((EINVAL, 2ul), c.ReadSimpleReply());
        // A WRITE's payload follows its header whatever the server thinks of it: one up to twice
        // the maximum is read and dropped, so the stream stays in step.
        var length = max + (1u << 20);
        c.Request(CmdWrite, 3, 0, length);
        for (var sent = 0u; sent < length; sent += (uint)chunk.Length)
        {
            c.Send(chunk);
        }
        Assert.Equal((EINVAL, 3ul), c.ReadSimpleReply());
        var allocated = GC.GetTotalAllocatedBytes(precise: true) - before;
        output.WriteLine($"allocated {allocated >> 10} KiB in this process while refusing reads of {max + 4096} and {uint.MaxValue} bytes and a write of {length}");
        Assert.True(allocated < 4 << 20, $"{allocated} bytes allocated");
        // Still in step: a read of the maximum is served.
        c.Request(CmdRead, 4, 0, max);
        Assert.Equal((0u, 4ul), c.ReadSimpleReply());
        var got = 0;
        while (got < max)
        {
            var n = c.Socket.Receive(chunk.AsSpan(0, (int)Math.Min(chunk.Length, max - got)));
            Assert.True(n > 0, "the server closed in the middle of a read");
            got += n;
        }
        // A payload too large to skip: the only safe answer is a hard disconnect (the protocol allows it).
        c.Request(CmdWrite, 5, 0, uint.MaxValue);
        Assert.True(c.IsClosedByServer());
        Assert.Equal(0, s.Server.InternalErrors);
        Assert.Equal(4, s.Server.RequestsRefused);
    }

    [Fact]
    public void ASlowlorisDoesNotKeepARealClientOut()
    {
        // Default limits (1024 connections, 10 s handshakes), as `ublksharp serve` runs.
        var options = new NbdServerOptions();
        var attackers = AttackerCount(options.MaxConnections);
        using var s = new TestServer(new MemoryTarget(16 << 20), tcp: true, options: options);
        var endPoint = new IPEndPoint(IPAddress.Loopback, s.Server.Address.Port);
        var pattern = new byte[4096];
        Random.Shared.NextBytes(pattern);
        Assert.Equal(pattern.Length, s.Target.Write(pattern, 0));
        using var attack = new Slowloris(endPoint, attackers);
        var clock = Stopwatch.StartNew();
        NbdBadInputTests.WaitFor(() => s.Server.ActiveConnections >= options.MaxConnections, "the slowloris to fill the server");
        output.WriteLine($"server full ({s.Server.ActiveConnections} of {options.MaxConnections}) after {clock.Elapsed.TotalSeconds:F1} s, {attack.Opened} slowloris connections opened");
        var times = new List<double>();
        var uri = NbdUri.Parse($"nbd://127.0.0.1:{s.Server.Address.Port}/");
        var buffer = new byte[4096];
        // Real clients a second apart, at least eight, and until the slowloris has opened all its
        // connections (the server, full, keeps taking them in place of older ones meanwhile).
        for (var i = 0; i < 8 || (!attack.Filled && clock.Elapsed < TimeSpan.FromSeconds(25)); i++)
        {
            var one = Stopwatch.StartNew();
            using (var client = NbdClient.Connect(uri, TimeSpan.FromSeconds(10), TimeSpan.FromSeconds(10)))
            {
                Assert.Equal(0, client.Read(buffer, 0));
            }
            times.Add(one.Elapsed.TotalMilliseconds);
            Assert.Equal(pattern, buffer);
            Assert.True(one.Elapsed < TimeSpan.FromSeconds(10), $"client {i} took {one.Elapsed.TotalSeconds:F1} s");
            Thread.Sleep(1000);
        }
        Assert.True(attack.Filled, $"the slowloris did not get to open all its {attackers} connections");
        times.Sort();
        output.WriteLine($"real clients (connect, handshake, 4k read): median {times[times.Count / 2]:F1} ms, max {times[^1]:F1} ms; " +
            $"{times.Count} clients over {clock.Elapsed.TotalSeconds:F1} s; slowloris: {attack.Opened} connections opened, {attack.Bytes} bytes trickled; server: {s.Server.ConnectionsAccepted} accepted, " +
            $"{s.Server.ConnectionsEvicted} evicted, {s.Server.HandshakeTimeouts} handshake timeouts, {s.Server.ConnectionsRefused} refused");
        Assert.True(s.Server.ConnectionsEvicted >= times.Count, $"only {s.Server.ConnectionsEvicted} evicted: the server was not full");
        Assert.Equal(0, s.Server.InternalErrors);
    }

    // 2,000 attackers where the fd limit allows (each is a client fd here and, for up to
    // MaxConnections of them, a server fd too); fewer, but more than the server takes, where not.
    private int AttackerCount(int maxConnections)
    {
        var soft = OpenFileLimit();
        var count = (int)Math.Min(2000, soft - maxConnections - 256);
        if (count < 2000)
        {
            output.WriteLine($"RLIMIT_NOFILE is {soft}: {count} attackers instead of 2000");
        }
        Assert.True(count > maxConnections, $"RLIMIT_NOFILE ({soft}) is too low to fill the server; raise it (ulimit -n)");
        return count;
    }

    private static long OpenFileLimit()
    {
        foreach (var line in File.ReadLines("/proc/self/limits"))
        {
            if (line.StartsWith("Max open files", StringComparison.Ordinal))
            {
                var soft = line["Max open files".Length..].Trim().Split(' ', StringSplitOptions.RemoveEmptyEntries)[0];
                return soft == "unlimited" ? long.MaxValue : long.Parse(soft, System.Globalization.CultureInfo.InvariantCulture);
            }
        }
        return 1024;
    }

    /// <summary>Client flags and a GO for <paramref name="export"/>: a whole handshake from the client's side.</summary>
    private static byte[] Handshake(string export)
    {
        var go = RawNbd.GoData(export);
        var m = new byte[4 + 16 + go.Length];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(m, ClientFlagFixedNewstyle | ClientFlagNoZeroes);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(m.AsSpan(4), OptionMagic);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(m.AsSpan(12), OptGo);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(m.AsSpan(16), (uint)go.Length);
        go.CopyTo(m, 20);
        return m;
    }

    /// <summary>
    /// Holds <c>count</c> connections open, each trickling a valid handshake at one byte a second
    /// and reopened when the server drops it, until disposed.
    /// </summary>
    private sealed class Slowloris : IDisposable
    {
        private readonly EndPoint _endPoint;
        private readonly Socket?[] _sockets;
        private readonly int[] _sent;
        private readonly byte[] _stream = Handshake("");
        private readonly Thread _thread;
        private volatile bool _stop;
        private volatile bool _filled;
        private long _opened;
        private long _bytes;

        public Slowloris(EndPoint endPoint, int count)
        {
            _endPoint = endPoint;
            _sockets = new Socket?[count];
            _sent = new int[count];
            _thread = new Thread(Run) { IsBackground = true, Name = "slowloris" };
            _thread.Start();
        }

        public long Opened => Interlocked.Read(ref _opened);

        /// <summary>Every one of the connections has been opened at least once.</summary>
        public bool Filled => _filled;

        public long Bytes => Interlocked.Read(ref _bytes);

        private void Run()
        {
            var next = Environment.TickCount64;
            while (!_stop)
            {
                for (var i = 0; i < _sockets.Length && !_stop; i++)
                {
                    if (_sockets[i] is null)
                    {
                        Open(i);
                        continue;
                    }
                    try
                    {
                        _sockets[i]!.Send(_stream.AsSpan(_sent[i] % _stream.Length, 1));
                        _sent[i]++;
                        Interlocked.Increment(ref _bytes);
                    }
                    catch (SocketException)
                    {
                        // Dropped by the server: come back.
                        _sockets[i]!.Dispose();
                        Open(i);
                    }
                }
                _filled = true;
                next += 1000;
                var wait = next - Environment.TickCount64;
                if (wait > 0)
                {
                    Thread.Sleep((int)wait);
                }
            }
        }

        private void Open(int i)
        {
            _sockets[i] = null;
            var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            try
            {
                socket.Connect(_endPoint);
                _sockets[i] = socket;
                _sent[i] = 0;
                Interlocked.Increment(ref _opened);
            }
            catch (SocketException)
            {
                socket.Dispose();
            }
        }

        public void Dispose()
        {
            _stop = true;
            _thread.Join(TimeSpan.FromSeconds(10));
            foreach (var s in _sockets)
            {
                s?.Dispose();
            }
        }
    }
}
