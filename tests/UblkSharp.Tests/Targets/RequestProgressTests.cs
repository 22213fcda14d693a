using UblkSharp.Interop;
using UblkSharp.Targets;

namespace UblkSharp.Tests.Targets;

/// <summary>
/// The one short-IO / EAGAIN policy that the ublk queues, the NBD server and the write-zeroes
/// fill-in all use, driven by a fault schedule.
/// </summary>
public class RequestProgressTests
{
    [Fact]
    public void ShortStepsAndEagainUnderAFaultScheduleStillMoveEveryByteOnce()
    {
        using var mem = new MemoryTarget(4 << 20);
        var data = LoopTargetTests.Pattern(1 << 20, 5);
        Assert.Equal(data.Length, mem.Write(data, 0));
        var faults = new FaultInjector(new FaultSchedule { Seed = 3, ShortIo = 0.5, Again = 0.3 }, 0);
        var back = new byte[data.Length];
        var steps = 0;
        const int request = 128 << 10;
        for (var offset = 0; offset < data.Length; offset += request)
        {
            var progress = new RequestProgress(StepKind.Read, request);
            var offsets = new List<long>();
            int error;
            while (true)
            {
                steps++;
                offsets.Add(progress.Done);
                var n = faults.Apply(mem.Read(back.AsSpan(offset + (int)progress.Done, request - (int)progress.Done), offset + progress.Done), isData: true, 512);
                if (!progress.Next(n, out error))
                {
                    break;
                }
            }
            Assert.Equal(0, error);
            Assert.False(progress.ZeroRest);
            // Each step starts where the last one ended: never before (work redone) nor past it (skipped).
            Assert.Equal(offsets.OrderBy(o => o), offsets);
        }
        Assert.Equal(data, back);
        Assert.True(faults.Injected > 8, $"only {faults.Injected} faults injected");
        Assert.True(steps > 8 + faults.Injected / 2, $"{steps} steps for {faults.Injected} faults");
    }

    [Fact]
    public void EagainGivesUpAfterTheBoundWithEio()
    {
        var progress = new RequestProgress(StepKind.Write, 4096);
        var steps = 0;
        int error;
        while (progress.Next(-Errno.EAGAIN, out error))
        {
            steps++;
        }
        Assert.Equal(-Errno.EIO, error);
        Assert.Equal(RequestProgress.MaxRetries, steps);

        // The bound is on retries in a row: progress in between starts the count again.
        progress = new RequestProgress(StepKind.Write, 8192);
        for (var i = 0; i < RequestProgress.MaxRetries; i++)
        {
            Assert.True(progress.Next(-Errno.EINTR, out _));
        }
        Assert.True(progress.Next(4096, out _));
        for (var i = 0; i < RequestProgress.MaxRetries; i++)
        {
            Assert.True(progress.Next(-Errno.EAGAIN, out _));
        }
        Assert.False(progress.Next(4096, out error));
        Assert.Equal(0, error);
    }

    [Fact]
    public void ZeroBytesEndAReadWithZerosAndFailAWrite()
    {
        var read = new RequestProgress(StepKind.Read, 8192);
        Assert.True(read.Next(1024, out _));
        Assert.False(read.Next(0, out var error));
        Assert.Equal(0, error);
        Assert.True(read.ZeroRest);
        Assert.Equal(1024, read.Done);

        var write = new RequestProgress(StepKind.Write, 8192);
        Assert.False(write.Next(0, out error));
        Assert.Equal(-Errno.EIO, error);

        var other = new RequestProgress(StepKind.Other, 1 << 20);
        Assert.False(other.Next(0, out error));
        Assert.Equal(0, error);
        Assert.False(other.ZeroRest);
        Assert.False(new RequestProgress(StepKind.Other, 0).Next(-Errno.ENOSPC, out error));
        Assert.Equal(-Errno.ENOSPC, error);
    }

    [Fact]
    public void MoreBytesThanAskedForCountOnlyAsTheRest()
    {
        var p = new RequestProgress(StepKind.Write, 4096);
        Assert.False(p.Next(1 << 20, out var error));
        Assert.Equal(0, error);
        Assert.Equal(4096, p.Done);
    }
}
