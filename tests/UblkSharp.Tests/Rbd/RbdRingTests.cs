using System.Diagnostics;
using System.Runtime.InteropServices;
using UblkSharp.Interop;
using UblkSharp.Targets;
using UblkSharp.Tests.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.Tests.Rbd;

/// <summary>
/// The rbd target's queue path on a real cluster: librbd AIO submitted from this thread, woken
/// through librbd's eventfd by an io_uring READ, completions reaped here with their tags.
/// </summary>
[Collection(nameof(CephCollection))]
public sealed unsafe class RbdRingTests(CephCluster cluster) : IDisposable
{
    private const int MiB = 1 << 20;
    private const int Depth = 32;
    private const int Slot = 128 * 1024;
    private readonly byte* _buffers = (byte*)NativeMemory.AlignedAlloc(Depth * Slot, 4096);

    public void Dispose() => NativeMemory.AlignedFree(_buffers);

    private byte* Buffer(int tag) => _buffers + ((long)tag * Slot);

    [Fact]
    public void Writes_and_reads_at_queue_depth_32_complete_with_their_tags_and_data()
    {
        var name = cluster.CreateImage(64 * MiB);
        using var t = cluster.Open(name);
        using var ring = new RbdRing(t);
        var random = new Random(42);
        var lengths = new int[Depth];
        for (var tag = 0; tag < Depth; tag++)
        {
            // Sizes from 4 KiB to 128 KiB, each tag its own 2 MiB slot (some straddle objects).
            lengths[tag] = 4096 * random.Next(1, 33);
            LoopTargetTests.Pattern(lengths[tag], 100 + tag).CopyTo(new Span<byte>(Buffer(tag), lengths[tag]));
            var fua = tag % 4 == 0 ? IoFlags.Fua : IoFlags.None;
            ring.Submit(tag, new BackendRequest(IoOp.Write, fua, Offset(tag), lengths[tag], Buffer(tag)));
        }
        Assert.Equal(Depth, ring.InFlight);
        ring.Drain(TimeSpan.FromSeconds(60));
        for (var tag = 0; tag < Depth; tag++)
        {
            Assert.Equal(lengths[tag], ring.Results[tag]);
            new Span<byte>(Buffer(tag), Slot).Clear();
            ring.Submit(tag, new BackendRequest(IoOp.Read, IoFlags.None, Offset(tag), lengths[tag], Buffer(tag)));
        }
        ring.Drain(TimeSpan.FromSeconds(60));
        for (var tag = 0; tag < Depth; tag++)
        {
            Assert.Equal(lengths[tag], ring.Results[tag]);
            Assert.True(new Span<byte>(Buffer(tag), lengths[tag]).SequenceEqual(LoopTargetTests.Pattern(lengths[tag], 100 + tag)), $"tag {tag} read back other data");
        }
        // The same data through the synchronous path, which another client would see too.
        var back = new byte[lengths[5]];
        Assert.Equal(back.Length, t.Read(back, Offset(5)));
        Assert.True(back.AsSpan().SequenceEqual(LoopTargetTests.Pattern(lengths[5], 105)));
    }

    [Fact]
    public void Four_queues_on_one_image_each_reap_only_their_own_completions()
    {
        const int queues = 4, perQueue = 8;
        var name = cluster.CreateImage(64 * MiB);
        using var t = cluster.Open(name);
        // Each queue on its own thread and ring, as the runtime runs them, all at once on the one
        // image handle: the same tags on every queue, disjoint regions, FUA on some.
        var errors = new System.Collections.Concurrent.ConcurrentQueue<string>();
        var threads = Enumerable.Range(0, queues).Select(q => new Thread(() =>
        {
            try
            {
                using var ring = new RbdRing(t, q);
                for (var round = 0; round < 3; round++)
                {
                    for (var tag = 0; tag < perQueue; tag++)
                    {
                        var buf = Buffer((q * perQueue) + tag);
                        LoopTargetTests.Pattern(Slot, (q * 1000) + (round * 100) + tag).CopyTo(new Span<byte>(buf, Slot));
                        ring.Submit(tag, new BackendRequest(IoOp.Write, tag % 3 == 0 ? IoFlags.Fua : IoFlags.None, QueueOffset(q, tag), Slot, buf));
                    }
                    ring.Drain(TimeSpan.FromSeconds(60));
                    for (var tag = 0; tag < perQueue; tag++)
                    {
                        Assert.Equal(Slot, ring.Results[tag]);
                        new Span<byte>(Buffer((q * perQueue) + tag), Slot).Clear();
                        ring.Submit(tag, new BackendRequest(IoOp.Read, IoFlags.None, QueueOffset(q, tag), Slot, Buffer((q * perQueue) + tag)));
                    }
                    ring.Drain(TimeSpan.FromSeconds(60));
                    for (var tag = 0; tag < perQueue; tag++)
                    {
                        Assert.Equal(Slot, ring.Results[tag]);
                        Assert.True(new Span<byte>(Buffer((q * perQueue) + tag), Slot).SequenceEqual(LoopTargetTests.Pattern(Slot, (q * 1000) + (round * 100) + tag)),
                            $"queue {q} tag {tag} round {round} read back other data");
                    }
                }
            }
            catch (Exception e)
            {
                errors.Enqueue($"queue {q}: {e.Message}");
            }
        })).ToList();
        threads.ForEach(th => th.Start());
        threads.ForEach(th => Assert.True(th.Join(TimeSpan.FromMinutes(3)), "a queue did not finish"));
        Assert.True(errors.IsEmpty, string.Join("\n", errors));
    }

    private static long QueueOffset(int queue, int tag) => (((long)queue * 8) + tag) * 2 * MiB;

    [Fact]
    public void Flush_discard_and_write_zeroes_complete_on_the_ring()
    {
        var name = cluster.CreateImage(16 * MiB);
        using var t = cluster.Open(name);
        Assert.Equal(12 * MiB, t.Write(LoopTargetTests.Pattern(12 * MiB, 3), 0));
        using var ring = new RbdRing(t);
        ring.Submit(0, new BackendRequest(IoOp.Flush, IoFlags.None, 0, 0, null));
        ring.Submit(1, new BackendRequest(IoOp.Discard, IoFlags.None, 4 * MiB, 4 * MiB, null));
        ring.Submit(2, new BackendRequest(IoOp.WriteZeroes, IoFlags.None, 9 * MiB, MiB, null));
        ring.Submit(3, new BackendRequest(IoOp.WriteZeroes, IoFlags.NoUnmap, 10 * MiB + 4096, 8192, null));
        ring.Drain(TimeSpan.FromSeconds(60));
        for (var tag = 0; tag < 4; tag++)
        {
            Assert.Equal(0, ring.Results[tag]);
        }
        var expected = LoopTargetTests.Pattern(12 * MiB, 3);
        Array.Clear(expected, 4 * MiB, 4 * MiB);
        Array.Clear(expected, 9 * MiB, MiB);
        Array.Clear(expected, 10 * MiB + 4096, 8192);
        var back = new byte[12 * MiB];
        Assert.Equal(back.Length, t.Read(back, 0));
        Assert.True(back.AsSpan().SequenceEqual(expected));
    }

    [Fact]
    public void Out_of_range_requests_fail_and_a_read_only_image_refuses_writes()
    {
        var name = cluster.CreateImage(8 * MiB);
        using (var t = cluster.Open(name))
        using (var ring = new RbdRing(t))
        {
            ring.Submit(0, new BackendRequest(IoOp.Write, IoFlags.None, 8 * MiB, 4096, Buffer(0)));
            ring.Submit(1, new BackendRequest(IoOp.Read, IoFlags.None, 16 * MiB, 4096, Buffer(1)));
            ring.Drain(TimeSpan.FromSeconds(60));
            Assert.True(ring.Results[0] < 0, $"a write past the end returned {ring.Results[0]}");
            Assert.True(ring.Results[1] < 0, $"a read past the end returned {ring.Results[1]}");
        }
        using var ro = cluster.Open(name, readOnly: true);
        using var roRing = new RbdRing(ro);
        roRing.Submit(0, new BackendRequest(IoOp.Write, IoFlags.None, 0, 4096, Buffer(0)));
        roRing.Submit(1, new BackendRequest(IoOp.Read, IoFlags.None, 0, 4096, Buffer(1)));
        roRing.Drain(TimeSpan.FromSeconds(60));
        Assert.Equal(-Errno.EROFS, roRing.Results[0]);
        Assert.Equal(4096, roRing.Results[1]);
    }

    [Fact]
    public void The_steady_state_submit_and_reap_path_allocates_nothing()
    {
        var name = cluster.CreateImage(16 * MiB);
        using var t = cluster.Open(name);
        using var ring = new RbdRing(t);
        RunMixed(ring, 1500); // JIT and tiering allocate while warming up
        var before = GC.GetAllocatedBytesForCurrentThread();
        RunMixed(ring, 1500);
        Assert.Equal(0, GC.GetAllocatedBytesForCurrentThread() - before);
    }

    private void RunMixed(RbdRing ring, int count)
    {
        var submitted = 0;
        for (var tag = 0; tag < Depth; tag++)
        {
            Start(ring, tag, submitted++);
        }
        var start = Stopwatch.GetTimestamp(); // a Stopwatch object would be the only allocation
        while (ring.InFlight > 0)
        {
            if (Stopwatch.GetElapsedTime(start) > TimeSpan.FromMinutes(2))
            {
                Assert.Fail("mixed IO did not finish");
            }
            ring.Poll(TimeSpan.FromMilliseconds(500));
            for (var tag = 0; tag < Depth; tag++)
            {
                if (ring.Done[tag])
                {
                    if (ring.Results[tag] < 0)
                    {
                        Assert.Fail($"tag {tag}: {ring.Results[tag]}");
                    }
                    if (submitted < count)
                    {
                        Start(ring, tag, submitted++);
                    }
                    else
                    {
                        ring.Done[tag] = false; // counted
                    }
                }
            }
        }
    }

    private void Start(RbdRing ring, int tag, int n)
    {
        var offset = (long)(n * 7919 % 4000) * 4096;
        ring.Submit(tag, n % 3 == 0
            ? new BackendRequest(IoOp.Write, n % 9 == 0 ? IoFlags.Fua : IoFlags.None, offset, 4096, Buffer(tag))
            : new BackendRequest(IoOp.Read, IoFlags.None, offset, 4096, Buffer(tag)));
    }

    private static long Offset(int tag) => (tag * 2L * MiB) - (tag % 3 == 0 ? 0 : 4096);
}
