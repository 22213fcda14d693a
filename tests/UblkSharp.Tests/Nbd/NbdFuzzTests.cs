using System.Buffers.Binary;
using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using UblkSharp.Nbd;
using UblkSharp.Targets;
using static UblkSharp.Nbd.Protocol.NbdProtocol;

namespace UblkSharp.Tests.Nbd;

/// <summary>
/// A seeded fuzz of both protocol phases: over 100,000 random and mutated messages across a few
/// thousand connections, against servers that run requests inline and on workers. Afterwards no
/// connection, thread or fd is left over, the server found no bug in itself, and real clients
/// are still served.
/// </summary>
[Collection(nameof(NbdSerialCollection))]
public class NbdFuzzTests
{
    private const int Seed = 20261121;
    private const int MessagesPerServer = 55_000;

    [Fact]
    public void HundredThousandRandomMessagesLeaveTheServerServing()
    {
        // Run the tools once first: the runtime keeps pipes and assembly mappings once it has spawned them.
        using (var warm = new TestServer(new MemoryTarget(1 << 20)))
        {
            Tools.Ok("qemu-io", "-f", "raw", "-c", "read 0 4k", warm.Uri);
            Tools.Ok("nbdinfo", "--json", warm.Uri);
        }
        var threadsBefore = Threads();
        var fdsBefore = Fds();
        var socketsBefore = Sockets();
        var sent = 0L;
        var sessions = 0;
        var clock = Stopwatch.StartNew();
        foreach (var execution in new[] { NbdExecution.Auto, NbdExecution.Workers })
        {
            var options = new NbdServerOptions { Execution = execution, HandshakeTimeout = TimeSpan.FromSeconds(2), MaxInFlightBytes = 8 << 20 };
            using var s = new TestServer(new MemoryTarget(16 << 20), "fuzz", options: options);
            var rng = new Random(Seed + (int)execution);
            var messages = 0L;
            var phase = Stopwatch.StartNew();
            var slowest = TimeSpan.Zero;
            while (messages < MessagesPerServer)
            {
                var t0 = phase.Elapsed;
                messages += Session(s, rng);
                sessions++;
                slowest = phase.Elapsed - t0 > slowest ? phase.Elapsed - t0 : slowest;
            }
            TestContext.Current.SendDiagnosticMessage($"fuzz {execution}: {messages} messages in {phase.Elapsed.TotalSeconds:F1} s, slowest session {slowest.TotalMilliseconds:F0} ms");
            sent += messages;
            NbdBadInputTests.WaitFor(() => s.Server.ActiveConnections == 0, "every fuzzed connection to close");
            Assert.Equal(0, s.Server.InternalErrors);
            Assert.True(s.Server.ProtocolErrors > 100, $"only {s.Server.ProtocolErrors} protocol errors: is the fuzz reaching the checks?");
            Assert.True(s.Server.RequestsRefused > 1000, $"only {s.Server.RequestsRefused} refused requests");
            Assert.True(s.Server.RequestsServed > 1000, $"only {s.Server.RequestsServed} served requests");
            // Real clients still get served, and the data they write is there.
            var output = Tools.Ok("qemu-io", "-f", "raw", "-c", "write -P 0x3c 1M 1M", "-c", "read -P 0x3c 1M 1M", s.Uri);
            Assert.DoesNotContain("fail", output, StringComparison.OrdinalIgnoreCase);
            Assert.Contains("\"export-size\": 16777216", Tools.Ok("nbdinfo", "--json", s.Uri), StringComparison.Ordinal);
        }
        Assert.True(sent >= 100_000, $"{sent} messages");
        // Disposed servers leave no threads or fds behind (a little slack for the runtime's own).
        NbdBadInputTests.WaitFor(() => Threads() <= threadsBefore + 3, $"threads to go back to {threadsBefore} (now {Threads()})");
        NbdBadInputTests.WaitFor(() => Sockets() <= socketsBefore, $"sockets to go back to {socketsBefore} (now {Sockets()})");
        NbdBadInputTests.WaitFor(() => Fds() <= fdsBefore + 4, $"fds to go back to {fdsBefore} (now {Fds()}: {FdList()})");
        TestContext.Current.SendDiagnosticMessage($"fuzz: {sent} messages in {sessions} sessions, {clock.Elapsed.TotalSeconds:F1} s");
    }

    /// <summary>One connection's worth of fuzz; returns the messages sent.</summary>
    private static int Session(TestServer s, Random rng)
    {
        using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        socket.Connect(new UnixDomainSocketEndPoint(s.SocketPath));
        socket.SendTimeout = 2000;
        var f = new Fuzzer(socket, rng, s.Export.Name);
        try
        {
            return rng.Next(10) < 4 ? f.Handshake() : f.Transmission();
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException or EndOfStreamException)
        {
            return f.Sent; // the server hung up, as it may
        }
    }

    private sealed class Fuzzer(Socket socket, Random rng, string export)
    {
        private readonly byte[] _drain = new byte[256 * 1024];

        public int Sent { get; private set; }

        public int Handshake()
        {
            Read(18);
            Send(Be32(rng.Next(8) == 0 ? (uint)rng.Next() : ClientFlagFixedNewstyle | ClientFlagNoZeroes));
            var count = rng.Next(1, 40);
            for (var i = 0; i < count; i++)
            {
                Send(RandomOption());
            }
            Finish();
            return Sent;
        }

        public int Transmission()
        {
            Read(18);
            Send(Be32(ClientFlagFixedNewstyle | ClientFlagNoZeroes));
            var structured = rng.Next(2) == 0;
            if (structured)
            {
                Send(Option(OptStructuredReply, []));
                if (rng.Next(2) == 0)
                {
                    Send(Option(OptSetMetaContext, RawNbd.MetaData(export, BaseAllocation)));
                }
            }
            Send(Option(OptGo, RawNbd.GoData(export)));
            var count = rng.Next(10, 120);
            for (var i = 0; i < count; i++)
            {
                Send(RandomRequest());
            }
            Finish();
            return Sent;
        }

        private void Finish()
        {
            switch (rng.Next(3))
            {
                case 0:
                    Send(Request(CmdDisc, 0, 0, 0));
                    break;
                case 1:
                    socket.Shutdown(SocketShutdown.Send);
                    break;
                default:
                    break; // just vanish
            }
            Drain();
        }

        private byte[] RandomOption()
        {
            var option = rng.Next(10) switch
            {
                < 6 => (uint)rng.Next(0, 12),
                < 8 => (uint)rng.Next(),
                _ => 0x80000000 | (uint)rng.Next(16),
            };
            var data = option switch
            {
                OptGo or OptInfo => Mutate(RawNbd.GoData(rng.Next(4) == 0 ? RandomString() : export, RandomInfos())),
                OptSetMetaContext or OptListMetaContext => Mutate(RawNbd.MetaData(rng.Next(4) == 0 ? RandomString() : export, RandomQueries())),
                OptExportName => Encoding.UTF8.GetBytes(rng.Next(2) == 0 ? export : RandomString()),
                _ => RandomBytes(rng.Next(4) == 0 ? rng.Next(0, 9000) : rng.Next(0, 16)),
            };
            var message = Option(option, data);
            switch (rng.Next(20))
            {
                case 0:
                    BinaryPrimitives.WriteUInt64BigEndian(message, (ulong)rng.NextInt64()); // bad magic
                    break;
                case 1:
                    BinaryPrimitives.WriteUInt32BigEndian(message.AsSpan(12), (uint)rng.Next()); // lying length
                    break;
                case 2:
                    return message[..rng.Next(message.Length)]; // truncated
                case 3:
                    return RandomBytes(rng.Next(1, 64));
                default:
                    break;
            }
            return message;
        }

        private byte[] RandomRequest()
        {
            var type = rng.Next(10) switch
            {
                < 7 => (ushort)rng.Next(0, 8),
                < 9 => (ushort)rng.Next(0, 12),
                _ => (ushort)rng.Next(),
            };
            if (type == CmdDisc && rng.Next(4) != 0)
            {
                type = CmdRead;
            }
            var flags = rng.Next(4) switch
            {
                0 => (ushort)rng.Next(0, 1 << 16),
                1 => (ushort)rng.Next(0, 32),
                _ => (ushort)0,
            };
            const long size = 16 << 20;
            var offset = rng.Next(8) switch
            {
                0 => (ulong)rng.NextInt64(),
                1 => (ulong)(size - rng.Next(0, 8192)),
                _ => (ulong)(rng.NextInt64(0, size / 512) * 512),
            };
            var length = rng.Next(12) switch
            {
                0 => (uint)rng.Next(),
                1 => 0u,
                2 => (uint)rng.Next(1, 1 << 20),
                _ => (uint)(rng.Next(1, 129) * 512),
            };
            var payload = type == CmdWrite && length <= 1 << 20
                ? RandomBytes(rng.Next(8) == 0 ? rng.Next(0, (int)length + 100) : (int)length)
                : [];
            var message = Request(type, flags, offset, length, payload);
            switch (rng.Next(40))
            {
                case 0:
                    BinaryPrimitives.WriteUInt32BigEndian(message, (uint)rng.Next()); // bad magic
                    break;
                case 1:
                    return message[..rng.Next(message.Length)];
                case 2:
                    return RandomBytes(rng.Next(1, 100));
                default:
                    break;
            }
            return message;
        }

        private ushort[] RandomInfos() => [.. Enumerable.Range(0, rng.Next(0, 6)).Select(_ => (ushort)rng.Next(0, 6))];

        private string[] RandomQueries() => [.. Enumerable.Range(0, rng.Next(0, 4)).Select(_ => rng.Next(3) switch
        {
            0 => BaseAllocation,
            1 => "base:",
            _ => RandomString(),
        })];

        private string RandomString() => Encoding.UTF8.GetString(RandomBytes(rng.Next(0, 40)));

        private byte[] Mutate(byte[] data)
        {
            if (data.Length > 0 && rng.Next(3) == 0)
            {
                var copy = (byte[])data.Clone();
                for (var i = rng.Next(1, 4); i > 0; i--)
                {
                    copy[rng.Next(copy.Length)] = (byte)rng.Next(256);
                }
                return rng.Next(4) == 0 ? copy[..rng.Next(copy.Length)] : copy;
            }
            return data;
        }

        private byte[] RandomBytes(int count)
        {
            var b = new byte[count];
            rng.NextBytes(b);
            return b;
        }

        private static byte[] Option(uint option, byte[] data)
        {
            var m = new byte[16 + data.Length];
            BinaryPrimitives.WriteUInt64BigEndian(m, OptionMagic);
            BinaryPrimitives.WriteUInt32BigEndian(m.AsSpan(8), option);
            BinaryPrimitives.WriteUInt32BigEndian(m.AsSpan(12), (uint)data.Length);
            data.CopyTo(m, 16);
            return m;
        }

        private static byte[] Request(ushort type, ushort flags, ulong offset, uint length, byte[]? payload = null)
        {
            var m = new byte[RequestSize + (payload?.Length ?? 0)];
            BinaryPrimitives.WriteUInt32BigEndian(m, RequestMagic);
            BinaryPrimitives.WriteUInt16BigEndian(m.AsSpan(4), flags);
            BinaryPrimitives.WriteUInt16BigEndian(m.AsSpan(6), type);
            BinaryPrimitives.WriteUInt64BigEndian(m.AsSpan(8), 1);
            BinaryPrimitives.WriteUInt64BigEndian(m.AsSpan(16), offset);
            BinaryPrimitives.WriteUInt32BigEndian(m.AsSpan(24), length);
            payload?.CopyTo(m, RequestSize);
            return m;
        }

        private static byte[] Be32(uint v) => RawNbd.Be32(v);

        private void Send(byte[] message)
        {
            Drain();
            var done = 0;
            while (done < message.Length)
            {
                done += socket.Send(message.AsSpan(done));
            }
            Sent++;
        }

        private void Read(int count)
        {
            var done = 0;
            while (done < count)
            {
                var n = socket.Receive(_drain.AsSpan(done, count - done));
                if (n == 0)
                {
                    throw new EndOfStreamException();
                }
                done += n;
            }
        }

        // Replies are read and dropped as they come, so the server never blocks on a full socket.
        private void Drain()
        {
            while (socket.Available > 0)
            {
                if (socket.Receive(_drain) == 0)
                {
                    throw new EndOfStreamException();
                }
            }
        }
    }

    private static int Threads() => Directory.GetDirectories("/proc/self/task").Length;

    private static int Fds() => Directory.GetFileSystemEntries("/proc/self/fd").Length;

    private static int Sockets() => new DirectoryInfo("/proc/self/fd").GetFileSystemInfos().Count(f =>
    {
        try
        {
            return f.LinkTarget?.StartsWith("socket:", StringComparison.Ordinal) == true;
        }
        catch (IOException)
        {
            return false;
        }
    });

    private static string FdList() => string.Join(", ", new DirectoryInfo("/proc/self/fd").GetFileSystemInfos()
        .Select(f => { try { return f.LinkTarget ?? "?"; } catch (IOException) { return "gone"; } })
        .GroupBy(t => t.Split(':')[0]).Select(g => $"{g.Key} x{g.Count()}"));
}
