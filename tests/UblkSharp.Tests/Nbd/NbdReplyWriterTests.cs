using System.Buffers.Binary;
using System.Net.Sockets;
using UblkSharp.Nbd;

namespace UblkSharp.Tests.Nbd;

/// <summary>The reply writer keeps every message whole while many threads send at once.</summary>
public class NbdReplyWriterTests
{
    [Fact]
    public void ConcurrentSmallAndLargeRepliesStayWhole()
    {
        var (a, b) = SocketPair();
        using var server = a;
        using var client = b;
        using var writer = new NbdReplyWriter(server);
        const int threads = 6;
        const int perThread = 400;
        var received = new Dictionary<int, int>();
        var reader = new Thread(() =>
        {
            var header = new byte[12];
            for (var i = 0; i < threads * perThread; i++)
            {
                Receive(client, header);
                var id = BinaryPrimitives.ReadInt32BigEndian(header);
                var length = BinaryPrimitives.ReadInt32BigEndian(header.AsSpan(4));
                var fill = header[8];
                var payload = new byte[length];
                Receive(client, payload);
                var bad = Array.FindIndex(payload, x => x != fill);
                Assert.True(bad < 0, $"message #{i} id {id} length {length} fill {fill}: byte {bad} is {(bad >= 0 ? payload[bad] : 0)}; previous {string.Join(",", received.TakeLast(3))}");
                received[id] = length;
            }
        });
        reader.IsBackground = true;
        reader.Start();
        var senders = Enumerable.Range(0, threads).Select(t => new Thread(() =>
        {
            var rng = new Random(t);
            var header = new byte[12];
            for (var i = 0; i < perThread; i++)
            {
                var id = (t * perThread) + i;
                var length = rng.Next(4) switch
                {
                    0 => 0,
                    1 => rng.Next(1, 4096),
                    2 => rng.Next(NbdReplyWriter.DirectThreshold - 100, NbdReplyWriter.DirectThreshold + 100),
                    _ => rng.Next(40_000, 300_000),
                };
                var payload = new byte[length];
                Array.Fill(payload, (byte)id);
                BinaryPrimitives.WriteInt32BigEndian(header, id);
                BinaryPrimitives.WriteInt32BigEndian(header.AsSpan(4), length);
                header[8] = (byte)id;
                if (rng.Next(8) == 0)
                {
                    writer.Cork();
                }
                Assert.True(writer.Send(header, payload));
                if (rng.Next(4) == 0)
                {
                    writer.Uncork();
                }
            }
        })).ToList();
        senders.ForEach(s => s.Start());
        senders.ForEach(s => s.Join());
        writer.Uncork();
        Assert.True(reader.Join(TimeSpan.FromSeconds(60)), "not every message arrived");
        Assert.Equal(threads * perThread, received.Count);
    }

    private static void Receive(Socket s, byte[] buffer)
    {
        var done = 0;
        while (done < buffer.Length)
        {
            var n = s.Receive(buffer.AsSpan(done)); if (n == 0) { throw new EndOfStreamException(); }
            Assert.True(n > 0, "end of stream");
            done += n;
        }
    }

    internal static (Socket, Socket) SocketPair()
    {
        var path = Path.Combine(Path.GetTempPath(), $"ublksharp-pair-{Guid.NewGuid():N}.sock");
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(new UnixDomainSocketEndPoint(path));
        listener.Listen(1);
        var client = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        client.Connect(new UnixDomainSocketEndPoint(path));
        var server = listener.Accept();
        File.Delete(path);
        return (server, client);
    }
}
