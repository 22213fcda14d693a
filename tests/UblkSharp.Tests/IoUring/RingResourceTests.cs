using System.Runtime.InteropServices;
using UblkSharp.Interop.IoUring;

namespace UblkSharp.Tests.IoUring;

[CollectionDefinition(nameof(SerialResourceCollection), DisableParallelization = true)]
public class SerialResourceCollection;

/// <summary>Leaks and allocations, measured with nothing else running in the process.</summary>
[Collection(nameof(SerialResourceCollection))]
public unsafe class RingResourceTests
{
    [Fact]
    public void TenThousandRingsLeakNoFdAndNoMapping()
    {
        for (var i = 0; i < 100; i++)
        {
            Ring.Create(new RingOptions { Entries = 8, Sqe128 = i % 2 == 0 }).Dispose();
        }
        var fdsBefore = RingFds();
        var mapsBefore = RingMappings();
        for (var i = 0; i < 10_000; i++)
        {
            using var ring = Ring.Create(new RingOptions { Entries = 8, Sqe128 = i % 2 == 0 });
            ring.GetSqe().PrepareNop(1);
            ring.SubmitAndWait(1);
        }
        Assert.Equal(0, fdsBefore);
        Assert.Equal(0, RingFds());
        Assert.Equal(0, mapsBefore);
        Assert.Equal(0, RingMappings());
    }

    [Fact]
    public void FinalizerReleasesAForgottenRing()
    {
        CreateAndForget();
        Assert.Equal(1, RingFds());
        GC.Collect();
        GC.WaitForPendingFinalizers();
        Assert.Equal(0, RingFds());
        Assert.Equal(0, RingMappings());

        [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.NoInlining)]
        static void CreateAndForget() => Ring.Create(new RingOptions { Entries = 8 });
    }

    // Counted by kind rather than in total: finalizers of other tests' objects close fds at any time.
    private static int RingFds() => new DirectoryInfo("/proc/self/fd").GetFileSystemInfos()
        .Count(f => f.LinkTarget?.Contains("io_uring", StringComparison.Ordinal) == true);

    private static int RingMappings() => File.ReadAllLines("/proc/self/maps").Count(l => l.Contains("io_uring", StringComparison.Ordinal));

    [Fact]
    public void SteadyStateSubmitAndCompleteAllocateNothing()
    {
        using var file = new TempFile(1 << 20);
        using var ring = Ring.Create(new RingOptions { Entries = 64, CompletionEntries = 128, SingleIssuer = true, CoopTaskrun = true, DeferTaskrun = true });
        var buf = (byte*)NativeMemory.AlignedAlloc(64 * 4096, 4096);
        try
        {
            RunOps(ring, file.Fd, buf, 1000); // warm up: JIT and tiering allocate
            var before = GC.GetAllocatedBytesForCurrentThread();
            var ops = RunOps(ring, file.Fd, buf, 50_000);
            var allocated = GC.GetAllocatedBytesForCurrentThread() - before;
            Assert.Equal(150_000, ops);
            Assert.Equal(0, allocated);
        }
        finally
        {
            NativeMemory.AlignedFree(buf);
        }
    }

    // Per round: a NOP, a 4 KiB read and a 4 KiB write, then a timed wait; returns the completions reaped.
    private static int RunOps(Ring ring, int fd, byte* buf, int rounds)
    {
        var reaped = 0;
        for (var r = 0; r < rounds; r++)
        {
            var slot = (uint)(r % 32);
            ring.GetSqe().PrepareNop(1);
            ring.GetSqe().PrepareRead(fd, buf + (slot * 4096), 4096, slot * 4096, 2);
            ring.GetSqe().PrepareWrite(fd, buf + ((slot + 32) * 4096), 4096, (slot + 32) * 4096, 3);
            ring.SubmitAndWait(3, TimeSpan.FromSeconds(5));
            while (ring.TryGetCompletion(out var cqe))
            {
                if (cqe.res < 0)
                {
                    throw new InvalidOperationException($"op {cqe.user_data} failed: {cqe.res}");
                }
                reaped++;
            }
        }
        while (reaped < rounds * 3)
        {
            ring.SubmitAndWait(1, TimeSpan.FromSeconds(5));
            while (ring.TryGetCompletion(out _))
            {
                reaped++;
            }
        }
        return reaped;
    }
}
