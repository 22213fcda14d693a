using UblkSharp.Interop;

namespace UblkSharp.Targets;

/// <summary>What to inject, and how often (each a probability per backend step, 0 to 1).</summary>
public sealed record FaultSchedule
{
    public int Seed { get; init; } = 1;

    /// <summary>Report fewer bytes than were done, so the runtime must retry the remainder.</summary>
    public double ShortIo { get; init; }

    /// <summary>Report -EAGAIN, so the runtime must retry the step.</summary>
    public double Again { get; init; }

    /// <summary>Fail the request with -EIO (a hard fault the client sees).</summary>
    public double Eio { get; init; }

    /// <summary>Hold the request for <see cref="DelayMs"/> before its backend work starts.</summary>
    public double Delay { get; init; }

    public int DelayMs { get; init; } = 5;

    public bool IsRetryableOnly => Eio == 0;

    public void Validate()
    {
        foreach (var (name, p) in new[] { ("short", ShortIo), ("eagain", Again), ("eio", Eio), ("delay", Delay) })
        {
            if (!(p >= 0 && p <= 1))
            {
                throw new ArgumentOutOfRangeException(name, $"The {name} fault rate must be between 0 and 1, not {p}");
            }
        }
        if (DelayMs is < 0 or > 60_000)
        {
            throw new ArgumentOutOfRangeException(nameof(DelayMs), "The fault delay must be 0 to 60000 ms");
        }
    }
}

/// <summary>
/// Wraps another target and injects faults from a seeded schedule. The faults are applied by the
/// runtime to the inner target's backend results (whether synchronous or io_uring), which is where
/// short and retried IO must be handled exactly once.
/// </summary>
public sealed class FaultTarget : BlockTarget
{
    public FaultTarget(BlockTarget inner, FaultSchedule schedule)
    {
        ArgumentNullException.ThrowIfNull(inner);
        ArgumentNullException.ThrowIfNull(schedule);
        schedule.Validate();
        Inner = inner;
        Schedule = schedule;
    }

    public BlockTarget Inner { get; }

    public FaultSchedule Schedule { get; }

    public override long Size => Inner.Size;

    public override bool CanResize => Inner.CanResize;

    public override void Resize(long newSize, bool growBacking) => Inner.Resize(newSize, growBacking);

    public override string Kind => "fault";

    public override IReadOnlyDictionary<string, string> Recipe
    {
        get
        {
            var r = new Dictionary<string, string>(Inner.Recipe)
            {
                ["base"] = Inner.Kind,
                ["seed"] = Schedule.Seed.ToString(System.Globalization.CultureInfo.InvariantCulture),
                ["short"] = Schedule.ShortIo.ToString(System.Globalization.CultureInfo.InvariantCulture),
                ["eagain"] = Schedule.Again.ToString(System.Globalization.CultureInfo.InvariantCulture),
                ["eio"] = Schedule.Eio.ToString(System.Globalization.CultureInfo.InvariantCulture),
                ["delay"] = Schedule.Delay.ToString(System.Globalization.CultureInfo.InvariantCulture),
                ["delay-ms"] = Schedule.DelayMs.ToString(System.Globalization.CultureInfo.InvariantCulture),
            };
            return r;
        }
    }

    public override int LogicalBlockSize => Inner.LogicalBlockSize;

    public override int PhysicalBlockSize => Inner.PhysicalBlockSize;

    public override bool IsReadOnly => Inner.IsReadOnly;

    public override bool HasVolatileCache => Inner.HasVolatileCache;

    public override bool CanDiscard => Inner.CanDiscard;

    public override bool CanWriteZeroes => Inner.CanWriteZeroes;

    public override bool HasNativeFua => Inner.HasNativeFua;

    public override bool IsRotational => Inner.IsRotational;

    public override bool SurvivesRestart => Inner.SurvivesRestart;

    public override int Read(Span<byte> buffer, long offset) => Inner.Read(buffer, offset);

    public override int Write(ReadOnlySpan<byte> data, long offset) => Inner.Write(data, offset);

    public override int WriteFua(ReadOnlySpan<byte> data, long offset) => Inner.WriteFua(data, offset);

    public override int Flush() => Inner.Flush();

    public override int Discard(long offset, long length) => Inner.Discard(offset, length);

    public override int WriteZeroes(long offset, long length, bool mayUnmap) => Inner.WriteZeroes(offset, length, mayUnmap);

    public override UringBackend? CreateUringBackend(int queueId) => Inner.CreateUringBackend(queueId);

    /// <summary>A per-queue fault source: seeded by the schedule and the queue id, so runs repeat.</summary>
    public FaultInjector CreateInjector(int queueId) => new(Schedule, queueId);

    protected override void Dispose(bool disposing)
    {
        Inner.Dispose();
        base.Dispose(disposing);
    }
}

/// <summary>Draws the faults for one queue. Not thread-safe; used on the queue's thread only.</summary>
public sealed class FaultInjector(FaultSchedule schedule, int queueId)
{
    private ulong _state = (ulong)(uint)schedule.Seed * 0x9e3779b97f4a7c15ul + (ulong)queueId + 1;

    public long Injected { get; private set; }

    /// <summary>How long to hold a new request before starting it, or zero.</summary>
    public TimeSpan DrawDelay()
    {
        if (schedule.Delay > 0 && Next() < schedule.Delay)
        {
            Injected++;
            return TimeSpan.FromMilliseconds(schedule.DelayMs);
        }
        return TimeSpan.Zero;
    }

    /// <summary>
    /// Rewrites a backend step's result. <paramref name="isData"/> marks READ/WRITE steps, whose
    /// positive byte counts can be shortened; <paramref name="blockSize"/> keeps short counts aligned.
    /// </summary>
    public int Apply(int result, bool isData, int blockSize)
    {
        if (result < 0)
        {
            return result;
        }
        var r = Next();
        if (r < schedule.Eio)
        {
            Injected++;
            return -Errno.EIO;
        }
        r -= schedule.Eio;
        if (r < schedule.Again)
        {
            Injected++;
            return -Errno.EAGAIN;
        }
        r -= schedule.Again;
        if (isData && r < schedule.ShortIo && result > blockSize)
        {
            Injected++;
            var blocks = result / blockSize;
            return (int)(1 + (Next() * (blocks - 1))) * blockSize;
        }
        return result;
    }

    private double Next()
    {
        // xorshift64*: cheap, allocation-free and repeatable.
        _state ^= _state >> 12;
        _state ^= _state << 25;
        _state ^= _state >> 27;
        return (_state * 0x2545F4914F6CDD1Dul >> 11) * (1.0 / (1ul << 53));
    }
}
