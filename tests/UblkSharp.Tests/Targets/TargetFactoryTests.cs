using UblkSharp.Targets;

namespace UblkSharp.Tests.Targets;

public class TargetFactoryTests
{
    private static Dictionary<string, string> Opts(params string[] pairs)
    {
        var d = new Dictionary<string, string>();
        for (var i = 0; i < pairs.Length; i += 2)
        {
            d[pairs[i]] = pairs[i + 1];
        }
        return d;
    }

    /// <summary>The error a person sees: an ArgumentException whose message has no .NET decoration.</summary>
    private static string Error(string kind, Dictionary<string, string> options)
    {
        var e = Assert.ThrowsAny<ArgumentException>(() => TargetFactory.Create(kind, options).Dispose());
        Assert.DoesNotContain("(Parameter", e.Message, StringComparison.Ordinal);
        Assert.DoesNotContain("Exception", e.Message, StringComparison.Ordinal);
        Assert.False(e.Message.EndsWith('.'), e.Message);
        return e.Message;
    }

    [Fact]
    public void KindsIncludeTheBuiltIns()
    {
        Assert.Subset(TargetFactory.Kinds.ToHashSet(), new HashSet<string> { "null", "mem", "loop", "fault" });
        Assert.Equal(TargetFactory.Kinds.Count, TargetFactory.Kinds.Distinct().Count());
    }

    [Fact]
    public void BuildsEachKind()
    {
        using (var t = TargetFactory.Create("null", Opts()))
        {
            Assert.IsType<NullTarget>(t);
            Assert.Equal(250L << 30, t.Size);
        }
        using (var t = TargetFactory.Create("null", Opts("size", "1M")))
        {
            Assert.Equal(1L << 20, t.Size);
            Assert.Equal("1048576", t.Recipe["size"]);
        }
        using (var t = TargetFactory.Create("mem", Opts("size", "64M")))
        {
            Assert.IsType<MemoryTarget>(t);
            Assert.Equal(64L << 20, t.Size);
            Assert.Equal("mem", t.Kind);
        }
        using var file = new TempFile(1 << 20);
        using (var t = TargetFactory.Create("loop", Opts("file", file.Path, "read-only", "on")))
        {
            var loop = Assert.IsType<LoopTarget>(t);
            Assert.Equal(1L << 20, loop.Size);
            Assert.True(loop.IsReadOnly);
            Assert.False(loop.DirectIo);
            Assert.Equal(file.Path, loop.Recipe["file"]);
        }
        using (var t = TargetFactory.Create("fault", Opts("size", "1M", "seed", "7", "short", "0.25", "eagain", "0.5", "eio", "0", "delay", "1", "delay-ms", "9")))
        {
            var f = Assert.IsType<FaultTarget>(t);
            Assert.IsType<MemoryTarget>(f.Inner);
            Assert.Equal(new FaultSchedule { Seed = 7, ShortIo = 0.25, Again = 0.5, Eio = 0, Delay = 1, DelayMs = 9 }, f.Schedule);
            Assert.Equal("mem", f.Recipe["base"]);
            Assert.Equal("0.25", f.Recipe["short"]);
            Assert.True(f.Schedule.IsRetryableOnly);
        }
        using (var t = TargetFactory.Create("fault", Opts("base", "loop", "file", file.Path)))
        {
            var f = Assert.IsType<FaultTarget>(t);
            Assert.IsType<LoopTarget>(f.Inner);
            Assert.Equal(f.Inner.Size, f.Size);
            Assert.Equal(new FaultSchedule(), f.Schedule);
        }
    }

    [Fact]
    public void LoopPathIsMadeAbsolute()
    {
        using var file = new TempFile(4096);
        var relative = Path.GetRelativePath(Environment.CurrentDirectory, file.Path);
        Assert.False(Path.IsPathRooted(relative));
        using var t = (LoopTarget)TargetFactory.Create("loop", Opts("file", relative));
        Assert.Equal(file.Path, t.Path);
    }

    [Fact]
    public void UnknownTypeListsTheKnownOnes()
    {
        Assert.Equal($"unknown target type 'no-such-type': use one of {string.Join(", ", TargetFactory.Kinds)}", Error("no-such-type", Opts()));
        Assert.StartsWith("unknown target type 'MEM': use one of null, mem, loop, fault", Error("MEM", Opts()), StringComparison.Ordinal);
        Assert.Contains("unknown target type ''", Error("", Opts()), StringComparison.Ordinal);
    }

    [Fact]
    public void MemNeedsASize()
    {
        Assert.Equal("this target needs --size, e.g. --size 1G", Error("mem", Opts()));
    }

    [Theory]
    [InlineData("mem", "1000", "bad size '1000': it must be a multiple of 4096 bytes")]
    [InlineData("mem", "2050K", "bad size '2050K': it must be a multiple of 4096 bytes")]
    [InlineData("null", "1000", "bad size '1000': it must be a multiple of 512 bytes")]
    [InlineData("mem", "12X", "bad size '12X': give a number of bytes with an optional K, M, G or T suffix, e.g. 512M")]
    [InlineData("mem", "0", "bad size '0': give a number of bytes with an optional K, M, G or T suffix, e.g. 512M")]
    [InlineData("null", "-1", "bad size '-1': give a number of bytes with an optional K, M, G or T suffix, e.g. 512M")]
    [InlineData("null", "1.5G", "bad size '1.5G': give a number of bytes with an optional K, M, G or T suffix, e.g. 512M")]
    public void BadSizesSayWhy(string kind, string size, string expected)
    {
        Assert.Equal(expected, Error(kind, Opts("size", size)));
    }

    [Fact]
    public void LoopNeedsAFile()
    {
        Assert.Equal("the loop target needs a backing file: -f FILE", Error("loop", Opts()));
        Assert.Equal("the loop target needs a backing file: -f FILE", Error("loop", Opts("file", "")));
    }

    [Fact]
    public void LoopOnAMissingFile()
    {
        var path = Path.Combine(Path.GetTempPath(), $"ublksharp-test-missing-{Guid.NewGuid():N}");
        Assert.Equal($"{path}: no such file", Error("loop", Opts("file", path)));
    }

    [Fact]
    public void LoopOnADirectory()
    {
        var dir = Directory.CreateTempSubdirectory("ublksharp-test-");
        try
        {
            var message = Error("loop", Opts("file", dir.FullName));
            Assert.Contains("is a directory", message, StringComparison.Ordinal);
            Assert.StartsWith(dir.FullName, message, StringComparison.Ordinal);
        }
        finally
        {
            dir.Delete();
        }
    }

    [Theory]
    [InlineData(0)]
    [InlineData(100)]
    [InlineData(511)]
    public void LoopOnAFileShorterThanASector(int bytes)
    {
        using var file = new TempFile(bytes);
        Assert.Equal($"{file.Path} is {bytes} bytes: a loop device needs at least 512", Error("loop", Opts("file", file.Path)));
    }

    [Fact]
    public void LoopOnAFileItCannotOpen()
    {
        // A Unix socket exists as a file but open(2) refuses it (even for root) with ENXIO.
        var path = Path.Combine(Path.GetTempPath(), $"ublksharp-test-sock-{Guid.NewGuid():N}");
        using var socket = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.Unix, System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Unspecified);
        socket.Bind(new System.Net.Sockets.UnixDomainSocketEndPoint(path));
        try
        {
            Assert.Equal($"{path}: cannot open it: ENXIO (6): No such device or address", Error("loop", Opts("file", path)));
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void FaultCannotWrapFault()
    {
        Assert.Equal("a fault target cannot wrap another fault target", Error("fault", Opts("base", "fault", "size", "1M")));
    }

    [Fact]
    public void FaultPassesItsOptionsToTheBase()
    {
        Assert.Equal("this target needs --size, e.g. --size 1G", Error("fault", Opts()));
        Assert.Equal("the loop target needs a backing file: -f FILE", Error("fault", Opts("base", "loop")));
        Assert.StartsWith("unknown target type 'disk'", Error("fault", Opts("base", "disk")), StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("short", "2")]
    [InlineData("short", "x")]
    [InlineData("eagain", "-0.1")]
    [InlineData("eio", "1.0001")]
    [InlineData("delay", "Infinity")]
    [InlineData("delay", "")]
    public void FaultRejectsBadRates(string key, string value)
    {
        Assert.Equal($"bad --{key} '{value}': give a probability from 0 to 1", Error("fault", Opts("size", "1M", key, value)));
    }

    [Fact]
    public void FaultRejectsANaNRateHumanly()
    {
        // double.TryParse accepts "NaN"; the schedule's own check must catch it, with the .NET suffix removed.
        Assert.Equal("The short fault rate must be between 0 and 1, not NaN", Error("fault", Opts("size", "1M", "short", "NaN")));
    }

    [Theory]
    [InlineData("seed", "-1")]
    [InlineData("seed", "x")]
    [InlineData("seed", "3000000000")]
    [InlineData("delay-ms", "1.5")]
    public void FaultRejectsBadNumbers(string key, string value)
    {
        Assert.Equal($"bad --{key} '{value}': give a whole number", Error("fault", Opts("size", "1M", key, value)));
    }

    [Fact]
    public void FaultRejectsALongDelayWithoutTheParameterSuffix()
    {
        Assert.Equal("The fault delay must be 0 to 60000 ms", Error("fault", Opts("size", "1M", "delay-ms", "60001")));
    }

    [Fact]
    public void NullOptionsAreRefused()
    {
        Assert.Throws<ArgumentNullException>(() => TargetFactory.Create("mem", null!));
    }
}
