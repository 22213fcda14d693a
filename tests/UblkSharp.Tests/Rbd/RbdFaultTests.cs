using System.Diagnostics;
using System.Runtime.InteropServices;
using UblkSharp.Interop;
using UblkSharp.Targets;
using UblkSharp.Tests.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.Tests.Rbd;

/// <summary>
/// The OSD dies during IO: the queue path fails its requests with EIO once the timeout passes
/// (none hangs), and once the OSD is back, new IO on the same open image succeeds.
/// </summary>
[Collection(nameof(CephCollection))]
public sealed unsafe class RbdFaultTests(CephCluster cluster) : IDisposable
{
    private const int MiB = 1 << 20;
    private const int Depth = 16;
    private const int TimeoutSeconds = 5;
    private readonly byte* _buffers = (byte*)NativeMemory.AlignedAlloc(Depth * 65536, 4096);

    public void Dispose() => NativeMemory.AlignedFree(_buffers);

    private byte* Buffer(int tag) => _buffers + ((long)tag * 65536);

    [Fact]
    public void Killing_the_OSD_fails_requests_with_EIO_within_the_timeout_and_IO_resumes_after_it_restarts()
    {
        var name = cluster.CreateImage(32 * MiB);
        var data = LoopTargetTests.Pattern(16 * MiB, 21);
        using (var writer = cluster.Open(name))
        {
            Assert.Equal(data.Length, writer.Write(data, 0));
            Assert.Equal(0, writer.Flush());
        }
        // A fresh open: nothing cached, so reads must go to the OSD; no flush yet, so librbd's
        // cache writes through and writes go to the OSD too.
        using var t = cluster.Open(name, timeoutSeconds: TimeoutSeconds);
        using var ring = new RbdRing(t);
        var osdKilled = false;
        try
        {
            cluster.KillOsd();
            osdKilled = true;
            var sw = Stopwatch.StartNew();
            for (var tag = 0; tag < Depth; tag++)
            {
                ring.Submit(tag, tag % 2 == 0
                    ? new BackendRequest(IoOp.Read, IoFlags.None, tag * MiB, 65536, Buffer(tag))
                    : new BackendRequest(IoOp.Write, IoFlags.None, (tag * MiB) + 65536, 65536, Buffer(tag)));
            }
            // Bounded: every request completes (none hangs) well within a few timeouts.
            ring.Drain(TimeSpan.FromSeconds(TimeoutSeconds * 8));
            var elapsed = sw.Elapsed;
            Console.WriteLine($"rbd fault: {Depth} requests to a dead OSD failed after {elapsed.TotalSeconds:F1} s (timeout {TimeoutSeconds} s)");
            for (var tag = 0; tag < Depth; tag++)
            {
                Assert.True(ring.Results[tag] == -Errno.EIO, $"tag {tag} ({(tag % 2 == 0 ? "read" : "write")}) completed with {ring.Results[tag]}, not -EIO");
            }

            cluster.StartOsd();
            osdKilled = false;
            // The OSD is back: new IO on the same image succeeds (librbd reconnects by itself; the
            // loop only covers the moments until the client sees the new OSD map).
            var deadline = Stopwatch.StartNew();
            int write;
            do
            {
                LoopTargetTests.Pattern(65536, 22).CopyTo(new Span<byte>(Buffer(0), 65536));
                ring.Submit(0, new BackendRequest(IoOp.Write, IoFlags.Fua, 20 * MiB, 65536, Buffer(0)));
                ring.Drain(TimeSpan.FromSeconds(TimeoutSeconds * 8));
                write = ring.Results[0];
            }
            while (write < 0 && deadline.Elapsed < TimeSpan.FromSeconds(120));
            Assert.Equal(65536, write);
            Console.WriteLine($"rbd fault: IO succeeded again {deadline.Elapsed.TotalSeconds:F1} s after the OSD restarted");
            ring.Submit(1, new BackendRequest(IoOp.Read, IoFlags.None, 2 * MiB, 65536, Buffer(1)));
            ring.Drain(TimeSpan.FromSeconds(TimeoutSeconds * 8));
            Assert.Equal(65536, ring.Results[1]);
            Assert.True(new Span<byte>(Buffer(1), 65536).SequenceEqual(data.AsSpan(2 * MiB, 65536)), "data written before the fault reads back");
        }
        finally
        {
            if (osdKilled)
            {
                cluster.StartOsd(); // the other tests need it
            }
        }
    }
}
