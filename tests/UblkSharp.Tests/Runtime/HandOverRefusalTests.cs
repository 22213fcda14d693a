using UblkSharp.Runtime;
using UblkSharp.Ublk;

namespace UblkSharp.Tests.Runtime;

/// <summary>Which devices may be handed to another daemon (upgrade), from their flags alone.</summary>
public class HandOverRefusalTests
{
    private const UblkFeatures On = UblkFeatures.UserRecovery;
    private const UblkFeatures Reissue = UblkFeatures.UserRecovery | UblkFeatures.UserRecoveryReissue;

    [Theory]
    [InlineData(On | UblkFeatures.Quiesce)]
    [InlineData(Reissue | UblkFeatures.Quiesce)]
    [InlineData(Reissue)]
    // Batched: handed over by the old daemon exiting, which requeues only under reissue.
    [InlineData(Reissue | UblkFeatures.Quiesce | UblkFeatures.BatchIo)]
    [InlineData(Reissue | UblkFeatures.BatchIo)]
    public void ThesePassOver(UblkFeatures flags) => Assert.Null(UblkDevice.HandOverRefusal(3, (ulong)flags));

    [Theory]
    [InlineData(UblkFeatures.None, "without recovery")]
    [InlineData(UblkFeatures.UserRecovery | UblkFeatures.UserRecoveryFailIo | UblkFeatures.Quiesce, "fail-io")]
    [InlineData(On, "QUIESCE_DEV")]
    [InlineData(On | UblkFeatures.Quiesce | UblkFeatures.BatchIo, "batched IO")]
    [InlineData(On | UblkFeatures.BatchIo, "batched IO")]
    public void TheseAreRefusedWithTheReason(UblkFeatures flags, string reason)
    {
        var why = UblkDevice.HandOverRefusal(3, (ulong)flags);
        Assert.NotNull(why);
        Assert.Contains(reason, why, StringComparison.Ordinal);
        Assert.Contains("device 3", why, StringComparison.Ordinal);
    }

    [Fact]
    public void BatchIsRefusedAtDepthOneOnly()
    {
        Assert.Contains("depth", UblkDevice.BatchRefusal(new DeviceOptions { Depth = 1, Batch = BatchMode.On }), StringComparison.Ordinal);
        Assert.Null(UblkDevice.BatchRefusal(new DeviceOptions { Depth = 2, Batch = BatchMode.On, Recovery = RecoveryMode.On }));
    }
}
