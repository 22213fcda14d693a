using UblkSharp.Runtime;
using UblkSharp.Ublk;

namespace UblkSharp.Tests.Runtime;

/// <summary>
/// Which devices `list` calls orphans: a pure function of the kernel's state and flags, whether a
/// daemon is at work on the device, and whether its recipe exists.
/// </summary>
public class OrphansTests
{
    private const UblkFeatures Off = UblkFeatures.UserCopy;
    private const UblkFeatures On = UblkFeatures.UserCopy | UblkFeatures.UserRecovery;
    private const UblkFeatures Reissue = UblkFeatures.UserRecovery | UblkFeatures.UserRecoveryReissue;

    [Theory]
    [InlineData(DeviceState.Live, Off, true)]
    [InlineData(DeviceState.Live, On, true)]
    [InlineData(DeviceState.Live, On, false)]
    [InlineData(DeviceState.Dead, Off, true)] // a daemon starting (before START_DEV) or stopping
    [InlineData(DeviceState.Dead, On, true)]
    [InlineData(DeviceState.Quiesced, On, true)] // a recovery under way
    [InlineData(DeviceState.Quiesced, Reissue, true)]
    [InlineData(DeviceState.FailIo, On | UblkFeatures.UserRecoveryFailIo, true)]
    public void ADeviceWithADaemonAtWorkIsNoOrphan(DeviceState state, UblkFeatures flags, bool recipe)
        => Assert.Null(Orphans.Reason(1, state, flags, daemonAlive: true, recipePresent: recipe));

    [Theory]
    [InlineData(DeviceState.Quiesced, On)]
    [InlineData(DeviceState.Quiesced, Reissue)]
    [InlineData(DeviceState.FailIo, On | UblkFeatures.UserRecoveryFailIo)]
    [InlineData(DeviceState.Live, Reissue)] // died a moment ago: the kernel has not quiesced it yet
    public void ADeviceThatRecoverCanBringBackIsNoOrphan(DeviceState state, UblkFeatures flags)
        => Assert.Null(Orphans.Reason(1, state, flags, daemonAlive: false, recipePresent: true));

    [Theory]
    [InlineData(DeviceState.Dead, true)]
    [InlineData(DeviceState.Dead, false)]
    [InlineData(DeviceState.Live, true)]
    public void WithoutRecoveryADeviceWhoseDaemonIsGoneIsAnOrphan(DeviceState state, bool recipe)
        => Assert.Equal("its daemon is gone and it was created without recovery", Orphans.Reason(2, state, Off, daemonAlive: false, recipePresent: recipe));

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void AStoppedDeviceWithoutADaemonIsAnOrphan(bool recipe)
        => Assert.Equal("it is stopped (DEAD) and no daemon serves it", Orphans.Reason(3, DeviceState.Dead, Reissue, daemonAlive: false, recipePresent: recipe));

    [Theory]
    [InlineData(DeviceState.Quiesced)]
    [InlineData(DeviceState.FailIo)]
    public void ARecoverableDeviceWhoseRecipeIsLostIsAnOrphan(DeviceState state)
    {
        var reason = Orphans.Reason(4, state, On, daemonAlive: false, recipePresent: false);
        Assert.Equal($"its daemon is gone and its recipe {DeviceRecord.PathFor(4)} is lost", reason);
    }

    [Theory]
    [InlineData(DeviceState.Quiesced, On)]
    [InlineData(DeviceState.Quiesced, Reissue)]
    [InlineData(DeviceState.Live, Reissue)]
    public void ADeviceWhoseTargetStateDiedWithItsDaemonIsAnOrphan(DeviceState state, UblkFeatures flags)
    {
        var reason = Orphans.Reason(5, state, flags, daemonAlive: false, recipePresent: true, stateLost: true);
        Assert.NotNull(reason);
        Assert.Contains("would lose writes", reason, StringComparison.Ordinal);
        // While a daemon (or a takeover) is at work, it is not.
        Assert.Null(Orphans.Reason(5, state, flags, daemonAlive: true, recipePresent: true, stateLost: true));
    }

    [Theory]
    [InlineData(DeviceState.Live, Off, true, RecoveryObstacle.NoRecovery)]
    [InlineData(DeviceState.Quiesced, Off, false, RecoveryObstacle.NoRecovery)]
    [InlineData(DeviceState.Live, On, true, RecoveryObstacle.Serving)]
    [InlineData(DeviceState.Live, On, false, RecoveryObstacle.None)]
    [InlineData(DeviceState.Quiesced, On, false, RecoveryObstacle.None)]
    [InlineData(DeviceState.Dead, On, false, RecoveryObstacle.Stopped)]
    public void TheRecoveryRulesAreOneFunction(DeviceState state, UblkFeatures flags, bool alive, RecoveryObstacle expected)
        => Assert.Equal(expected, Recoverability.Obstacle(state, flags, alive));
}
