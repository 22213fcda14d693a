using UblkSharp.Runtime;

namespace UblkSharp.Tests.Runtime;

/// <summary>The per-device takeover lock: one holder at a time, a loser told who holds it, and looking never takes it.</summary>
[System.Runtime.Versioning.SupportedOSPlatform("linux")]
public sealed class TakeoverLockTests : IDisposable
{
    private readonly DirectoryInfo _dir = Directory.CreateTempSubdirectory("ublksharp-lock-");

    public void Dispose() => _dir.Delete(recursive: true);

    [Fact]
    public void OneHolderAtATimeAndTheLoserIsToldWhoHoldsIt()
    {
        Assert.False(TakeoverLock.IsHeld(_dir.FullName, 3));
        using (var first = TakeoverLock.Take(_dir.FullName, 3, "recover"))
        {
            Assert.Equal(3u, first.Id);
            Assert.True(TakeoverLock.IsHeld(_dir.FullName, 3));
            // flock is per open file: a second open in this same process is a second taker.
            var e = Assert.Throws<TakeoverInProgressException>(() => TakeoverLock.Take(_dir.FullName, 3, "upgrade"));
            Assert.Contains("another recovery (or upgrade) of device 3 is in progress", e.Message, StringComparison.Ordinal);
            Assert.Contains($"pid {Environment.ProcessId}, recover", e.Message, StringComparison.Ordinal);
            // Another device's lock is its own.
            using var other = TakeoverLock.Take(_dir.FullName, 4, "recover");
            Assert.True(TakeoverLock.IsHeld(_dir.FullName, 3)); // the loser's try left the holder's lock alone
        }
        Assert.False(TakeoverLock.IsHeld(_dir.FullName, 3));
        TakeoverLock.Take(_dir.FullName, 3, "upgrade").Dispose();
        // Read once the lock is gone: .NET's File.ReadAllText takes a shared flock of its own.
        Assert.Equal($"pid {Environment.ProcessId}, upgrade\n", File.ReadAllText(Path.Combine(_dir.FullName, "3.lock")));
    }

    [Fact]
    public void LookingDoesNotTakeTheLock()
    {
        for (var i = 0; i < 100; i++)
        {
            Assert.False(TakeoverLock.IsHeld(_dir.FullName, 5));
        }
        using var held = TakeoverLock.Take(_dir.FullName, 5, "recover");
        for (var i = 0; i < 100; i++)
        {
            Assert.True(TakeoverLock.IsHeld(_dir.FullName, 5));
        }
    }

    [Fact]
    public void TheKernelDropsTheLockOfAProcessThatDies()
    {
        // flock(1) holds the lock in another process, which is then killed.
        var path = Path.Combine(_dir.FullName, "6.lock");
        File.WriteAllText(path, "");
        using var holder = System.Diagnostics.Process.Start("flock", ["-x", path, "sleep", "600"])!;
        Assert.True(SpinWait.SpinUntil(() => TakeoverLock.IsHeld(_dir.FullName, 6), TimeSpan.FromSeconds(10)), "flock(1) did not take the lock");
        Assert.Throws<TakeoverInProgressException>(() => TakeoverLock.Take(_dir.FullName, 6, "recover"));
        holder.Kill(entireProcessTree: true);
        holder.WaitForExit();
        Assert.True(SpinWait.SpinUntil(() => !TakeoverLock.IsHeld(_dir.FullName, 6), TimeSpan.FromSeconds(10)), "the dead holder's lock stayed");
        using var mine = TakeoverLock.Take(_dir.FullName, 6, "recover");
    }
}
